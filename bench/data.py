"""Data-plane benchmark: ingest throughput, and our Streaming loader against webdataset on the same data.

    .venv/bin/python bench/data.py [--n 2048] [--workers 2] [--batch-size 64] [--image-size 64]

Builds an img2dataset-style webdataset source of photo-like JPEGs, then prints:
1. ingest: source MB/s and samples/s of ``maeclip data ingest`` (resize to 256 px, JPEG quality 90);
2. decode: PIL vs ``torchvision.io`` decode + RandomResizedCrop on the ingested (stored-resolution) JPEGs;
3. loader: samples/s of one epoch of ``build_train_loader`` (decode + augment + tokenize) and of webdataset
   (``webdataset.WebDataset`` + ``WebLoader``) reading the same ingested images and captions from tars, with
   the same decode, transform, tokenizer, batch size and worker count; and the ratio ours / webdataset.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from streaming import StreamingDataset
from torchvision.transforms import v2

from trainer.config import load_config
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


def bench_decode(samples: list[tuple[str, bytes, str]]) -> None:
    images = [image for _, image, _ in samples[:512]]
    timings = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, which torch limits to one thread
    for size in (64, 224):
        crop = v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                    antialias=True)
        for name, decode in (("PIL", decode_image), ("torchvision.io", decode_tensor)):
            started = time.perf_counter()
            for data in images:
                crop(decode(data))  # on a PIL image, PIL resizes; on a tensor, torch does
            timings[f"{name} decode+crop {size}px"] = len(images) / (time.perf_counter() - started)
    torch.set_num_threads(threads)
    print("decode    " + "   ".join(f"{name}: {rate:.0f}/s" for name, rate in timings.items()))


def _epoch_rates(loader, n_expected: int) -> tuple[float, float]:
    """Samples/s over the whole epoch (worker start-up included), and from the first batch on."""
    seen, started, first = 0, time.perf_counter(), None
    for batch in loader:
        if first is None:
            first = (time.perf_counter(), len(batch[0]))
        seen += len(batch[0])
    ended = time.perf_counter()
    assert seen >= n_expected * 0.9, (seen, n_expected)
    return seen / (ended - started), (seen - first[1]) / (ended - first[0])


def bench_loaders(url: str, root: Path, samples: list, args: argparse.Namespace) -> None:
    import webdataset as wds

    config = load_config("tiny-clip", [f"data.url={url}", f"data.batch_size={args.batch_size}",
                                       f"data.num_workers={args.workers}", f"model.image_size={args.image_size}"])
    ours = _epoch_rates(([b["image"]] for b in build_train_loader(config)), len(samples))

    tars = write_tars(root / "same-as-mds", samples, shards=max(2 * args.workers, 2))
    transform = train_transform(config.data, args.image_size)
    context = config.model.context_length

    def prepare(sample: tuple[bytes, bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        image, caption = sample  # the same decode, augmentation and tokenizer as ours
        return transform(decode_tensor(image)), tokenize([caption.decode()], context)[0]

    pipeline = (wds.WebDataset(tars, shardshuffle=False, empty_check=False).shuffle(1000)
                .to_tuple("jpg", "txt").map(prepare).batched(args.batch_size, partial=False))
    theirs = _epoch_rates(wds.WebLoader(pipeline, batch_size=None, num_workers=args.workers), len(samples))
    print(f"loader    batch {args.batch_size}, {args.workers} workers, {args.image_size}px, {len(samples)} samples")
    for number, what in enumerate(("whole epoch", "after the first batch")):
        print(f"  {what:22s} maeclip (Streaming MDS) {ours[number]:8.1f} samples/s   webdataset "
              f"{theirs[number]:8.1f} samples/s   ratio {ours[number] / theirs[number]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=4, help="input tars")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maeclip-bench-") as tmp:
        root = Path(tmp)
        url = bench_ingest(root, args.n, args.shards, args.workers)
        samples = stored_samples(url)
        bench_decode(samples)
        bench_loaders(url, root, samples, args)


if __name__ == "__main__":
    main()
