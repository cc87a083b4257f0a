"""Data-plane benchmark: ingest throughput, and our Streaming loader against webdataset on the same data.

    .venv/bin/python bench/data.py [--n 2048] [--workers 2] [--batch-size 64] [--image-size 64] [--epochs 4]

Builds an img2dataset-style webdataset source of photo-like JPEGs, then prints:
1. ingest: source MB/s and samples/s of ``maeclip data ingest`` (resize to 256 px, JPEG quality 90);
2. decode: one thread decoding the ingested (stored-resolution) JPEGs and random-resized-cropping them, with PIL
   and open_clip's training transform against ``torchvision.io`` and ours;
3. loader: samples/s of ``build_train_loader`` (decode + augment + tokenize) over ``--epochs`` epochs, the first
   and the median of the later ones, against webdataset (``webdataset.WebDataset`` + ``WebLoader``) reading the
   same ingested images and captions from tars, with the same tokenizer, batch size and worker count, twice: as
   open_clip_train's pipeline reads it (PIL decode and open_clip's transform), and with our decode and transform,
   which leaves only the loaders' own overhead; and the ratios ours / webdataset.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from streaming import StreamingDataset

from trainer.config import Config, load_config
from trainer.data.ingest import IngestOptions, ingest
from trainer.data.loader import build_train_loader
from trainer.data.tokenizer import tokenize
from trainer.data.transforms import decode_image, decode_tensor, train_transform

WORDS = ["a", "photo", "of", "the", "red", "blue", "green", "big", "small", "dog", "cat", "car", "tree",
         "house", "on", "in", "with", "near"]


def _photo(rng: random.Random, size: tuple[int, int]) -> bytes:
    """A smooth random field plus noise: compresses like a photograph, unlike flat synthetic shapes."""
    coarse = np.array([[[rng.randrange(256) for _ in range(3)] for _ in range(6)] for _ in range(5)], np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-12, 12, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(folder: Path, samples: list[tuple[str, bytes, str]], shards: int) -> list[str]:
    """``KEY.jpg`` + ``KEY.txt`` tars, as img2dataset writes them; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, image, caption in samples[shard::shards]:
                _add(tar, f"{key}.jpg", image)
                _add(tar, f"{key}.txt", caption.encode())
        paths.append(str(path))
    return paths


def bench_ingest(root: Path, n: int, shards: int, workers: int) -> str:
    rng = random.Random(0)
    samples = [(f"{i:09d}", _photo(rng, (rng.randint(320, 480), rng.randint(260, 400))),
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))) for i in range(n)]
    tars = write_tars(root / "src", samples, shards)
    megabytes = sum(os.path.getsize(p) for p in tars) / 1e6
    started = time.perf_counter()
    ingest(f"file://{root}/src", f"file://{root}/mds", IngestOptions(format="webdataset"), workers=workers)
    seconds = time.perf_counter() - started
    print(f"ingest    {megabytes / seconds:8.1f} MB/s  {n / seconds:8.1f} samples/s  ({megabytes:.0f} MB source, "
          f"{workers} workers)")
    return f"file://{root}/mds"


def stored_samples(url: str) -> list[tuple[str, bytes, str]]:
    dataset = StreamingDataset(local=url.removeprefix("file://") + "/train", shuffle=False, batch_size=1)
    return [(s["key"], s["image"], s["caption"]) for s in (dataset[i] for i in range(dataset.num_samples))]


def bench_decode(samples: list[tuple[str, bytes, str]], config: Config) -> None:
    """Decode + random crop + normalise, one thread: PIL with open_clip's transform against ours."""
    images = [image for _, image, _ in samples[:512]]
    timings = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, which torch limits to one thread
    for size in (64, 224):
        ours = train_transform(config.data, size)
        pipelines = {
            "PIL + open_clip transform": (decode_image, open_clip_train_transform(config, size)),
            "torchvision.io + ours": (decode_tensor, lambda image, ours=ours: ours(image, 0)),
        }
        for name, (decode, transform) in pipelines.items():
            started = time.perf_counter()
            for data in images:
                transform(decode(data))
            timings[f"{name} {size}px"] = len(images) / (time.perf_counter() - started)
    torch.set_num_threads(threads)
    print("decode    " + "   ".join(f"{name}: {rate:.0f}/s" for name, rate in timings.items()))


def open_clip_train_transform(config: Config, image_size: int) -> Callable:
    """open_clip's training transform (PIL RandomResizedCrop, ToTensor, Normalize) at our crop scale and stats."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=True, mean=config.data.image_mean,
                                     std=config.data.image_std, aug_cfg={"scale": config.data.crop_scale})


def _epoch_rate(loader: Iterable, n_expected: int) -> float:
    """Samples/s of one epoch, from asking for the first batch to the last one."""
    seen, started = 0, time.perf_counter()
    for batch in loader:
        seen += len(batch[0])
    assert seen >= n_expected * 0.9, (seen, n_expected)
    return seen / (time.perf_counter() - started)


def bench_loaders(config: Config, root: Path, samples: list, args: argparse.Namespace) -> None:
    import webdataset as wds

    tars = write_tars(root / "same-as-mds", samples, shards=max(2 * args.workers, 2))
    context = config.model.context_length
    open_clip_transform = open_clip_train_transform(config, args.image_size)
    our_transform = train_transform(config.data, args.image_size)

    def web_loader(pipeline: wds.DataPipeline) -> wds.WebLoader:
        # Persistent workers, as our loader has: later epochs reuse the worker processes.
        return wds.WebLoader(pipeline, batch_size=None, num_workers=args.workers,
                             persistent_workers=args.workers > 0)

    def shuffled_samples() -> wds.WebDataset:
        return wds.WebDataset(tars, shardshuffle=False, empty_check=False).shuffle(1000)

    def open_clip_pipeline() -> wds.WebLoader:
        """webdataset as open_clip_train reads it (training/data.py: get_wds_dataset): PIL decode, map, batch."""
        return web_loader(shuffled_samples().decode("pilrgb").rename(image="jpg", text="txt")
                          .map_dict(image=open_clip_transform, text=lambda text: tokenize([text], context)[0])
                          .to_tuple("image", "text").batched(args.batch_size, partial=False))

    def same_decode_pipeline() -> wds.WebLoader:
        """webdataset with our decode, transform and tokenizer: the difference left is the loader itself."""
        def prepare(sample: tuple[bytes, bytes]) -> tuple[torch.Tensor, torch.Tensor]:
            image, caption = sample
            seed = random.getrandbits(62)
            return our_transform(decode_tensor(image), seed), tokenize([caption.decode()], context)[0]
        return web_loader(shuffled_samples().to_tuple("jpg", "txt").map(prepare)
                          .batched(args.batch_size, partial=False))

    ours = build_train_loader(config)
    loaders = {"maeclip (Streaming MDS)": ours, "webdataset, open_clip's pipeline": open_clip_pipeline(),
               "webdataset, our decode + transform": same_decode_pipeline()}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.epochs):  # epoch by epoch in turn, so that load from other processes falls on all alike
        for name, loader in loaders.items():
            batches = ([b["image"]] for b in loader) if loader is ours else loader
            rates[name].append(_epoch_rate(batches, len(samples)))
    print(f"loader    batch {args.batch_size}, {args.workers} workers, {args.image_size}px, {len(samples)} samples, "
          f"{args.epochs} epochs")
    ours_name = next(iter(rates))
    for what, pick in (("first epoch (worker start-up included)", lambda r: r[0]),
                       ("later epochs (median)", lambda r: statistics.median(r[1:]))):
        print(f"  {what}: {ours_name} {pick(rates[ours_name]):.1f} samples/s")
        for name in list(rates)[1:]:
            print(f"    {name:36s} {pick(rates[name]):8.1f} samples/s   ratio ours / it "
                  f"{pick(rates[ours_name]) / pick(rates[name]):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=4, help="input tars")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loader (at least 2)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch and the later ones are reported apart")
    with tempfile.TemporaryDirectory(prefix="maeclip-bench-") as tmp:
        root = Path(tmp)
        url = bench_ingest(root, args.n, args.shards, args.workers)
        samples = stored_samples(url)
        config = load_config("tiny-clip", [f"data.url={url}", f"data.batch_size={args.batch_size}",
                                           f"data.num_workers={args.workers}", f"model.image_size={args.image_size}"])
        bench_decode(samples, config)
        bench_loaders(config, root, samples, args)


if __name__ == "__main__":
    main()
