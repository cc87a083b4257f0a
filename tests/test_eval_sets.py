"""Eval sets in their published formats (trainer.data.eval_sets), on real pixels: sklearn's digits and crops of its
sample photos, laid out as torchvision's ImageFolder, clip_benchmark's webdataset export, Karpathy's COCO / Flickr
JSON and our MDS corpora; read against torchvision's and clip_benchmark's own readers where they exist."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from eval_sets import (
    digits_images,
    photo_crops,
    tar_member,
    upload,
    wds_key,
    write_clip_benchmark_wds,
    write_imagefolder,
    write_karpathy,
    write_mds,
)
from PIL import Image
from services import loopback_http
from torchvision.transforms.functional import pil_to_tensor

from trainer import storage
from trainer.config import load_config
from trainer.data import eval_sets
from trainer.data.eval_sets import (
    MAX_TEXT_BYTES,
    EvalSet,
    classnames,
    detect_format,
    iter_eval_set,
    open_eval_set,
    templates,
)
from trainer.data.loader import DataError, subset_priority
from trainer.data.shapes import write_shapes
from trainer.data.transforms import decode_tensor, eval_transform

CONFIG = load_config("tiny-clip", [])
TRANSFORM = eval_transform(CONFIG.data, CONFIG.model.image_size)
SYNSETS = Path(torchvision.__file__).parents[1] / "timm" / "data" / "_info" / "imagenet_synsets.txt"
DIGIT_NAMES = [f"digit_{d}" for d in range(10)]


def _read(eval_set: EvalSet, split: str = "test", batch_size: int = 4, limit: int | None = None) -> dict:
    """One pass, flattened: keys, labels, captions, first captions, meta and the stacked images."""
    batches = list(iter_eval_set(eval_set, split, CONFIG, batch_size, limit))
    assert all(len(b["key"]) <= batch_size for b in batches)
    assert all(set(b) == {"key", "image", "caption", "captions", "meta"} for b in batches)
    return {"key": [k for b in batches for k in b["key"]], "labels": [m["labels"] for b in batches for m in b["meta"]],
            "meta": [m for b in batches for m in b["meta"]], "caption": [c for b in batches for c in b["caption"]],
            "captions": [c for b in batches for c in b["captions"]], "sizes": [len(b["key"]) for b in batches],
            "image": torch.cat([b["image"] for b in batches]) if batches else torch.empty(0)}


def _pixels(pngs: list[bytes]) -> torch.Tensor:
    return torch.stack([TRANSFORM(decode_tensor(png), 0) for png in pngs])


def _lowest(keys: list[str], n: int) -> list[str]:
    """The n keys of lowest subset priority, in the given order."""
    chosen = set(sorted(keys, key=subset_priority)[:n])
    return [k for k in keys if k in chosen]


# ---------------------------------------------------------------------------------------------------------
# Every format, end to end.


def test_imagefolder_and_clip_benchmark_webdataset_eval_sets(tmp_path):
    digits = digits_images(6)
    write_imagefolder(tmp_path / "folder", "", [(png, label % 2) for png, label in digits], ["big_cat", "dog"])
    (tmp_path / "folder" / "dog" / "README.txt").write_text("not an image")
    folder = open_eval_set(f"file://{tmp_path}/folder")
    assert folder == EvalSet(f"file://{tmp_path}/folder", "imagefolder")
    assert classnames(folder, "test") == ["big cat", "dog"] and templates(folder) == []
    got = _read(folder)
    assert got["sizes"] == [4, 2] and got["image"].shape == (6, 3, 64, 64)
    assert got["key"] == ["big_cat/0.png", "big_cat/2.png", "big_cat/4.png", "dog/1.png", "dog/3.png", "dog/5.png"]
    assert got["labels"] == [{"class": "big cat", "label": 0}] * 3 + [{"class": "dog", "label": 1}] * 3
    assert got["captions"] == [[]] * 6 and got["caption"] == [""] * 6
    assert torch.equal(got["image"], _pixels([digits[i][0] for i in (0, 2, 4, 1, 3, 5)]))

    write_clip_benchmark_wds(tmp_path / "wds", "test", [(png, [2, 1, 0, 1][i]) for i, (png, _) in
                                                         enumerate(digits[:4])],
                             classnames=["cat", "dog", "bird"], templates=["a photo of a {c}."], shard_size=2)
    wds = open_eval_set(f"file://{tmp_path}/wds")
    assert wds.format == "webdataset" and classnames(wds, "test") == ["cat", "dog", "bird"]
    assert templates(wds) == ["a photo of a {c}."]
    got = _read(wds, batch_size=3)
    assert got["key"] == [wds_key(i) for i in range(4)] and got["sizes"] == [3, 1]
    assert got["labels"] == [{"class": c, "label": i} for c, i in (("bird", 2), ("dog", 1), ("cat", 0), ("dog", 1))]
    assert torch.equal(got["image"], _pixels([png for png, _ in digits[:4]]))

    write_shapes(f"file://{tmp_path}/mds", n_train=8, n_eval=16, seed=3)
    mds = open_eval_set(f"file://{tmp_path}/mds")
    assert mds.format == "mds" and classnames(mds, "eval") == [] and templates(mds) == []
    got = _read(mds, "eval", batch_size=8)
    assert got["key"] == [f"eval-{i:07d}" for i in range(16)]
    assert got["captions"] == [[c] for c in got["caption"]] and all(got["caption"])


def test_detect_format_tells_every_layout(tmp_path):
    digits = digits_images(4)
    write_imagefolder(tmp_path / "splits", "train", digits, DIGIT_NAMES)
    write_imagefolder(tmp_path / "splits", "val", digits, DIGIT_NAMES)
    write_imagefolder(tmp_path / "single", "", digits, DIGIT_NAMES)
    write_clip_benchmark_wds(tmp_path / "wds", "test", digits, classnames=DIGIT_NAMES)
    write_clip_benchmark_wds(tmp_path / "bare-wds", "test", digits)  # only test/{0.tar, nshards.txt}
    write_karpathy(tmp_path / "coco", "coco", [(digits[0][0], ["a digit"], "test")])
    write_mds(f"file://{tmp_path}/mds", "eval", [{"key": "a", "image": digits[0][0], "caption": "x", "meta": {}}])
    expected = {"splits": "imagefolder", "single": "imagefolder", "wds": "webdataset", "bare-wds": "webdataset",
                "coco": "karpathy", "mds": "mds", "mds/eval": "mds"}
    assert {name: detect_format(f"file://{tmp_path}/{name}") for name in expected} == expected
    assert {name: open_eval_set(f"file://{tmp_path}/{name}/").format for name in expected} == expected
    with pytest.raises(DataError, match=f"no eval set at file://{tmp_path}/nothing"):
        detect_format(f"file://{tmp_path}/nothing")


def test_open_eval_set_refuses_unknown_formats_and_karpathy_options_elsewhere(tmp_path):
    url = f"file://{tmp_path}"
    with pytest.raises(DataError, match="unknown eval set format 'tfds'"):
        open_eval_set(url, "tfds")
    with pytest.raises(DataError, match="annotations and images are for karpathy sets, not imagefolder"):
        open_eval_set(url, "imagefolder", annotations="dataset_coco.json")
    with pytest.raises(DataError, match="not webdataset"):
        open_eval_set(url, "webdataset", images="images")
    assert open_eval_set(url, "karpathy", "ann/dataset_x.json", "imgs") == EvalSet(url, "karpathy",
                                                                                  "ann/dataset_x.json", "imgs")
    with pytest.raises(DataError, match="unknown eval set format 'tar'"):
        next(iter_eval_set(EvalSet(url, "tar"), "test", CONFIG, 4))


# ---------------------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_splits_and_order_match_torchvision_imagefolder(tmp_path):
    digits = digits_images(36)
    write_imagefolder(tmp_path, "train", digits[:24], DIGIT_NAMES)  # file names 0..23: "10.png" sorts before "2.png"
    write_imagefolder(tmp_path, "val", digits[24:], DIGIT_NAMES)
    eval_set = open_eval_set(f"file://{tmp_path}")
    for split in ("train", "val"):
        reference = torchvision.datasets.ImageFolder(str(tmp_path / split), allow_empty=True)
        assert classnames(eval_set, split) == [name.replace("_", " ") for name in reference.classes]
        got = _read(eval_set, split, batch_size=5)
        assert got["key"] == [os.path.relpath(path, tmp_path / split) for path, _ in reference.samples]
        assert [labels["label"] for labels in got["labels"]] == [label for _, label in reference.samples]
        assert [labels["class"] for labels in got["labels"]] == [reference.classes[label].replace("_", " ")
                                                                 for _, label in reference.samples]
        expected = torch.stack([TRANSFORM(pil_to_tensor(reference.loader(path)), 0) for path, _ in reference.samples])
        assert torch.equal(got["image"], expected)
    assert len(_read(eval_set, "train")["key"]) == 24 and len(_read(eval_set, "val")["key"]) == 12


def test_a_single_split_tree_is_read_for_any_split(tmp_path):
    digits = digits_images(10)
    write_imagefolder(tmp_path, "", digits, DIGIT_NAMES)
    (tmp_path / "digit_3" / "notes.md").write_text("# not an image")
    (tmp_path / "digit_3" / "scan.JPEG").write_bytes(digits[3][0])  # ImageNet's upper-case extension counts
    eval_set = open_eval_set(f"file://{tmp_path}")
    got = _read(eval_set, "val")
    assert got["key"] == ["digit_0/0.png", "digit_1/1.png", "digit_2/2.png", "digit_3/3.png", "digit_3/scan.JPEG",
                          *(f"digit_{d}/{d}.png" for d in range(4, 10))]
    assert [labels["label"] for labels in got["labels"]] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]
    assert _read(eval_set, "test")["key"] == got["key"] and classnames(eval_set, "test") == [
        f"digit {d}" for d in range(10)]


def test_a_1000_class_imagenet_tree_keeps_its_wnids_in_sorted_order(tmp_path):
    wnids = SYNSETS.read_text().split()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    (png, _), = digits_images(1, size=8)
    for wnid in reversed(wnids):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG").write_bytes(png)
    eval_set = open_eval_set(f"file://{tmp_path}")
    assert eval_set.format == "imagefolder" and classnames(eval_set, "val") == wnids
    got = _read(eval_set, "val", batch_size=8, limit=20)
    keys = [f"{wnid}/ILSVRC2012_val_{wnid}.JPEG" for wnid in wnids]
    assert got["key"] == _lowest(keys, 20)
    assert got["labels"] == [{"class": key.split("/")[0], "label": wnids.index(key.split("/")[0])}
                             for key in got["key"]]


def test_an_imagefolder_limit_takes_the_lowest_priority_keys_across_classes(tmp_path):
    digits = digits_images(40)
    write_imagefolder(tmp_path, "test", digits, DIGIT_NAMES)
    eval_set = open_eval_set(f"file://{tmp_path}")
    everything = _read(eval_set)["key"]
    assert len(everything) == 40
    got = _read(eval_set, limit=7)
    assert got["key"] == _lowest(everything, 7) != everything[:7]
    classes = lambda keys: {key.split("/")[0] for key in keys}  # noqa: E731
    assert len(classes(got["key"])) > len(classes(everything[:7])) == 2  # spread, not the first class folders
    by_key = {f"digit_{label}/{i}.png": png for i, (png, label) in enumerate(digits)}
    assert torch.equal(got["image"], _pixels([by_key[key] for key in got["key"]]))
    assert _read(eval_set, limit=100)["key"] == everything
    assert _read(eval_set, limit=0)["key"] == []
    with pytest.raises(DataError, match="limit -1 is negative"):
        _read(eval_set, limit=-1)


# ---------------------------------------------------------------------------------------------------------
# clip_benchmark webdataset


def test_clip_benchmark_webdataset_sets_on_every_storage(tmp_path, run_url):
    digits = digits_images(20)
    names = [f"the number {d}" for d in range(10)]
    write_clip_benchmark_wds(tmp_path / "cls", "test", digits, classnames=names,
                             templates=["a photo of {c}.", "a drawing of {c}."], shard_size=8)
    with tarfile.open(tmp_path / "cls" / "test" / "3.tar", "w") as tar:  # beyond nshards.txt (3): never read
        tar_member(tar, "stray.png", digits[0][0])
        tar_member(tar, "stray.cls", b"0")
    crops = photo_crops(6)
    captions = [[caption, f"picture {i} of sklearn's samples", f"crop number {i}"] for i, (_, caption) in
                enumerate(crops)]
    write_clip_benchmark_wds(tmp_path / "ret", "test", crops, retrieval_captions=captions, shard_size=4)
    upload(tmp_path, run_url)

    classification = open_eval_set(storage.join(run_url, "cls"))
    assert classification.format == "webdataset" and classnames(classification, "test") == names
    assert templates(classification) == ["a photo of {c}.", "a drawing of {c}."]
    got = _read(classification, batch_size=6)
    assert got["key"] == [wds_key(i) for i in range(20)] and got["sizes"] == [6, 6, 6, 2]
    assert got["labels"] == [{"class": names[label], "label": label} for _, label in digits]
    assert got["captions"] == [[]] * 20
    assert torch.equal(got["image"], _pixels([png for png, _ in digits]))
    assert _read(classification, limit=10)["key"] == [wds_key(i) for i in range(10)]  # first n in shard order

    retrieval = open_eval_set(storage.join(run_url, "ret"))
    assert retrieval.format == "webdataset" and classnames(retrieval, "test") == [] and templates(retrieval) == []
    got = _read(retrieval, batch_size=4)
    assert got["key"] == [wds_key(i) for i in range(6)]
    assert got["captions"] == captions and got["caption"] == [c[0] for c in captions]
    assert got["labels"] == [{}] * 6
    assert torch.equal(got["image"], _pixels([png for png, _ in crops]))


def _webp(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:WebDataset.shardshuffle")  # clip_benchmark's call, not ours
def test_webdataset_sets_read_as_clip_benchmark_reads_them(tmp_path):
    from clip_benchmark.datasets.builder import build_dataset

    digits = digits_images(14)
    write_clip_benchmark_wds(tmp_path / "cls", "test", digits[:10], classnames=[f"d{d}" for d in range(10)],
                             templates=["{c}"], shard_size=4)
    # A fourth shard of what other exports hold: dots in folder names and extensions, upper-case extensions,
    # several images of one sample (clip_benchmark takes webp, then png, jpg, jpeg), metadata beside them.
    with tarfile.open(tmp_path / "cls" / "test" / "3.tar", "w") as tar:
        for name, data in (("k10.seg.png", digits[13][0]), ("k10.png", digits[10][0]), ("k10.cls", b"0"),
                           ("k11.JPG", digits[11][0]), ("k11.cls", b" 1\n"),
                           ("k12.jpg", digits[13][0]), ("k12.png", digits[12][0]), ("k12.json", b"{}"),
                           ("k12.cls", b"2"),
                           ("sub.dir/k13.png", digits[10][0]), ("sub.dir/k13.webp", _webp(digits[13][0])),
                           ("sub.dir/k13.cls", b"3")):
            tar_member(tar, name, data)
    (tmp_path / "cls" / "test" / "nshards.txt").write_text("4\n")
    crops = photo_crops(5)
    captions = [[caption, f"crop {i}"] for i, (_, caption) in enumerate(crops)]
    write_clip_benchmark_wds(tmp_path / "ret", "test", crops, retrieval_captions=captions, shard_size=2)

    def transform(image: Image.Image) -> torch.Tensor:
        return TRANSFORM(pil_to_tensor(image.convert("RGB")), 0)

    reference = build_dataset("wds/x", root=str(tmp_path / "cls"), transform=transform)
    images, labels = zip(*reference, strict=True)
    eval_set = open_eval_set(f"file://{tmp_path}/cls")
    got = _read(eval_set)
    assert got["key"][10:] == ["k10", "k11", "k12", "sub.dir/k13"]
    assert [labels["label"] for labels in got["labels"]] == list(labels) == [*(d for _, d in digits[:10]), 0, 1, 2, 3]
    assert classnames(eval_set, "test") == reference.classes and templates(eval_set) == reference.templates
    assert torch.equal(got["image"], torch.stack(images))
    assert torch.equal(got["image"][10:], _pixels([digits[i][0] for i in (10, 11, 12, 13)]))

    reference = build_dataset("wds/x", root=str(tmp_path / "ret"), transform=transform, task="zeroshot_retrieval")
    images, texts = zip(*reference, strict=True)
    got = _read(open_eval_set(f"file://{tmp_path}/ret"))
    assert got["captions"] == list(texts) == captions
    assert torch.equal(got["image"], torch.stack(images))


def test_webdataset_without_nshards_reads_its_tars_in_numeric_order(tmp_path):
    digits = digits_images(12)
    write_clip_benchmark_wds(tmp_path / "split", "test", digits, classnames=DIGIT_NAMES, shard_size=1)
    (tmp_path / "split" / "test" / "nshards.txt").unlink()
    assert _read(open_eval_set(f"file://{tmp_path}/split"))["key"] == [wds_key(i) for i in range(12)]  # 10 after 9
    for tar in (tmp_path / "split" / "test").iterdir():  # tars at the root, no split folder
        tar.rename(tmp_path / "split" / tar.name)
    (tmp_path / "split" / "test").rmdir()
    got = _read(open_eval_set(f"file://{tmp_path}/split"), "test")
    assert got["key"] == [wds_key(i) for i in range(12)]
    assert got["labels"] == [{"class": f"digit_{d}", "label": d} for _, d in digits]  # as in classnames.txt


# ---------------------------------------------------------------------------------------------------------
# Karpathy splits


KARPATHY_SPLITS = ["train", "test", "val", "test", "restval", "test", "val", "train", "test", "val"]


def test_karpathy_coco_splits_captions_and_filepaths(tmp_path):
    crops = photo_crops(10)
    write_karpathy(tmp_path, "coco", [(png, [f"  {caption}\n", f"crop {i} again"], split) for i, ((png, caption), split)
                                      in enumerate(zip(crops, KARPATHY_SPLITS, strict=True))])
    eval_set = open_eval_set(f"file://{tmp_path}")
    assert eval_set == EvalSet(f"file://{tmp_path}", "karpathy")
    assert classnames(eval_set, "test") == [] and templates(eval_set) == []
    for split in ("test", "val", "train", "restval"):
        chosen = [i for i, s in enumerate(KARPATHY_SPLITS) if s == split]
        got = _read(eval_set, split, batch_size=3)
        assert got["key"] == [f"val2014/COCO_val2014_{i:012d}.png" for i in chosen]
        assert got["captions"] == [[crops[i][1], f"crop {i} again"] for i in chosen]
        assert got["caption"] == [crops[i][1] for i in chosen]
        assert got["meta"] == [{"labels": {}, "cocoid": i, "imgid": i} for i in chosen]
        assert torch.equal(got["image"], _pixels([crops[i][0] for i in chosen]))
    test_keys = [f"val2014/COCO_val2014_{i:012d}.png" for i, s in enumerate(KARPATHY_SPLITS) if s == "test"]
    assert _read(eval_set, "test", limit=2)["key"] == _lowest(test_keys, 2)
    with pytest.raises(DataError, match=r"dataset_coco.json: no images of split 'testing'"):
        _read(eval_set, "testing")


def test_karpathy_flickr_without_filepath_with_named_annotations_and_images(tmp_path):
    crops = photo_crops(4)
    (tmp_path / "flickr30k-images").mkdir()
    entries = []
    for i, (png, caption) in enumerate(crops):
        (tmp_path / "flickr30k-images" / f"{1000 + i}.jpg").write_bytes(png)
        entries.append({"filename": f"{1000 + i}.jpg", "imgid": i, "split": "test" if i % 2 else "train",
                        "sentences": [{"raw": caption}, {"raw": f"photo {i}"}]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=r"2 Karpathy split files .*\(dataset_flickr30k\.json, dataset_flickr8k"):
        _read(open_eval_set(f"file://{tmp_path}"))
    eval_set = open_eval_set(f"file://{tmp_path}", annotations="dataset_flickr30k.json", images="flickr30k-images")
    got = _read(eval_set)
    assert got["key"] == ["1001.jpg", "1003.jpg"]
    assert got["captions"] == [[crops[1][1], "photo 1"], [crops[3][1], "photo 3"]]
    assert got["meta"] == [{"labels": {}, "imgid": 1}, {"labels": {}, "imgid": 3}]
    assert torch.equal(got["image"], _pixels([crops[1][0], crops[3][0]]))


@pytest.fixture
def http_server():
    """A loopback HTTP server that serves a real PNG for any path; yields (its URL, the paths it was asked)."""
    with loopback_http(digits_images(1)[0][0]) as (port, requests):
        yield f"http://127.0.0.1:{port}", requests


@pytest.mark.parametrize("filepath, filename", [
    ("", "../outside.png"),
    ("val2014", "../../outside.png"),
    ("..", "outside.png"),
    ("", "/etc/passwd"),
    ("", "HTTP/x.png"),
    ("", "gs://other-bucket/x.png"),
    ("", "file:///etc/passwd"),
    ("val2014", "x.png::http://127.0.0.1/x.png"),
])
def test_karpathy_paths_outside_the_image_root_are_refused_unread(tmp_path, http_server, filepath, filename):
    server, requests = http_server
    filename = filename.replace("HTTP", server)
    (png, _), = digits_images(1)
    (tmp_path / "outside.png").write_bytes(png)  # a real image, were the path followed
    root = tmp_path / "coco"
    write_karpathy(root, "coco", [(png, ["a digit"], "test")])
    data = json.loads((root / "dataset_coco.json").read_text())
    data["images"].append({"filepath": filepath, "filename": filename, "split": "test", "sentences": [{"raw": "x"}]})
    (root / "dataset_coco.json").write_text(json.dumps(data))
    batches = iter_eval_set(open_eval_set(f"file://{root}"), "test", CONFIG, 4)
    key = f"{filepath}/{filename}" if filepath else filename
    with pytest.raises(DataError, match=re.escape(f"images[1] {key!r} is refused")) as refused:
        next(batches)  # refused before the first (good) image is read
    assert str(refused.value).startswith(f"file://{root}/dataset_coco.json: ") and "\n" not in str(refused.value)
    assert requests == []
    urllib.request.urlopen(f"{server}/alive", timeout=5).read()  # the server was there to be asked
    assert requests == ["/alive"]


# ---------------------------------------------------------------------------------------------------------
# MDS


def test_mds_batches_carry_every_caption_and_a_limit_is_the_first_samples(tmp_path):
    digits = digits_images(10)
    write_mds(f"file://{tmp_path}/set", "test", [
        {"key": f"digit-{i:02d}", "image": png, "caption": f"the digit {label}", "meta": {"labels": {"label": label}},
         "captions": [f"the digit {label}", f"a handwritten {label}"]} for i, (png, label) in enumerate(digits)])
    write_mds(f"file://{tmp_path}/set", "bare", [
        {"key": f"b{i}", "image": png, "caption": "" if i == 1 else f"digit {label}", "meta": {}}
        for i, (png, label) in enumerate(digits[:3])])
    eval_set = open_eval_set(f"file://{tmp_path}/set")
    got = _read(eval_set)
    assert got["key"] == [f"digit-{i:02d}" for i in range(10)]
    assert got["captions"] == [[f"the digit {label}", f"a handwritten {label}"] for _, label in digits]
    assert got["labels"] == [{"label": label} for _, label in digits]
    assert torch.equal(got["image"], _pixels([png for png, _ in digits]))
    limited = _read(eval_set, limit=6)
    assert limited["key"] == got["key"][:6] and limited["sizes"] == [4, 2]
    bare = _read(eval_set, "bare")
    assert bare["captions"] == [["digit 0"], [], ["digit 2"]] and bare["meta"] == [{"labels": {}}] * 3
    assert _read(open_eval_set(f"file://{tmp_path}/set/test"), "test")["key"] == got["key"]  # a split itself


# ---------------------------------------------------------------------------------------------------------
# Untrusted bytes: caps and malformed input.


def test_oversized_metadata_members_images_and_annotations_are_refused(tmp_path, monkeypatch):
    digits = digits_images(3)
    write_clip_benchmark_wds(tmp_path / "names", "test", digits, classnames=DIGIT_NAMES)
    (tmp_path / "names" / "classnames.txt").write_text("a class\n" * (MAX_TEXT_BYTES // 8 + 1))
    names = open_eval_set(f"file://{tmp_path}/names")
    with pytest.raises(DataError, match=re.escape(f"'file://{tmp_path}/names/classnames.txt' is larger than the "
                                                  f"{MAX_TEXT_BYTES} bytes")):
        classnames(names, "test")
    with pytest.raises(DataError, match=r"classnames\.txt' is larger than"):
        _read(names)

    write_clip_benchmark_wds(tmp_path / "captions", "test", digits, retrieval_captions=[["x"], ["y"], ["z"]])
    with tarfile.open(tmp_path / "captions" / "test" / "0.tar", "w") as tar:
        tar_member(tar, "big.png", digits[0][0])
        tar_member(tar, "big.txt", b"a caption\n" * (MAX_TEXT_BYTES // 10 + 1))
    with pytest.raises(DataError, match=r"0.tar: 'big.txt' is 1048580 bytes, over the limit of 1048576"):
        _read(open_eval_set(f"file://{tmp_path}/captions"))

    write_clip_benchmark_wds(tmp_path / "images", "test", digits, classnames=DIGIT_NAMES)
    assert len(_read(open_eval_set(f"file://{tmp_path}/images"))["key"]) == 3
    monkeypatch.setattr(eval_sets, "MAX_IMAGE_BYTES", min(len(png) for png, _ in digits) - 1)
    with pytest.raises(DataError, match=r"0.tar: 's0000000.png' is \d+ bytes, over the limit"):
        _read(open_eval_set(f"file://{tmp_path}/images"))
    write_imagefolder(tmp_path / "folder", "", digits, DIGIT_NAMES)
    with pytest.raises(DataError, match=r"the image of 'digit_0/0.png': .*0.png' is larger than"):
        _read(open_eval_set(f"file://{tmp_path}/folder"))
    write_karpathy(tmp_path / "coco", "coco", [(png, ["a digit"], "test") for png, _ in digits])
    with pytest.raises(DataError, match=r"the image of 'val2014/COCO_val2014_000000000000.png'"):
        _read(open_eval_set(f"file://{tmp_path}/coco"))
    monkeypatch.setattr(eval_sets, "MAX_ANNOTATION_BYTES", 100)
    with pytest.raises(DataError, match=r"dataset_coco.json: not a Karpathy split file: TooLarge"):
        _read(open_eval_set(f"file://{tmp_path}/coco"))


def _wds(root: Path, members: list[tuple[str, bytes]], names: list[str] | None = None, nshards: str = "1") -> str:
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for name, data in members:
            tar_member(tar, name, data)
    (root / "test" / "nshards.txt").write_text(nshards)
    if names:
        (root / "classnames.txt").write_text("\n".join(names))
    return f"file://{root}"


def _karpathy(root: Path, document: str) -> str:
    root.mkdir()
    (root / "dataset_coco.json").write_text(document)
    return f"file://{root}"


def _truncated(root: Path) -> str:
    url = _wds(root, [(f"k{i}.png", digits_images(8)[i][0]) for i in range(8)])
    tar = root / "test" / "0.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    return url


PNG = digits_images(1)[0][0]
MALFORMED = {
    "cls-not-an-int": (lambda root: _wds(root, [("k.png", PNG), ("k.cls", b"three")], ["a"]),
                       "0.tar: the .cls of 'k' is not a class index: b'three'"),
    "cls-out-of-range": (lambda root: _wds(root, [("k.png", PNG), ("k.cls", b"3")], ["a", "b", "c"]),
                         "0.tar: the .cls of 'k' is 3, not an index of the 3 classes of classnames.txt"),
    "negative-cls": (lambda root: _wds(root, [("k.png", PNG), ("k.cls", b"-1")], ["a", "b"]),
                     "the .cls of 'k' is -1"),
    "no-image": (lambda root: _wds(root, [("a.png", PNG), ("a.cls", b"0"), ("k.cls", b"0")], ["a"]),
                 "0.tar: sample 'k' has no image (.webp, .png, .jpg, .jpeg)"),
    "undecodable-member": (lambda root: _wds(root, [("k.png", b"\x89PNG not really")]),
                           "the image of 'k' is undecodable image"),
    "nshards-not-an-int": (lambda root: _wds(root, [("k.png", PNG)], nshards="two"),
                           "test/nshards.txt: not a number of shards: 'two'"),
    "nshards-too-many": (lambda root: _wds(root, [("k.png", PNG)], nshards="2"), "test/1.tar: no such shard"),
    "truncated-tar": (_truncated, "0.tar: unreadable tar"),
    "json-without-images": (lambda root: _karpathy(root, '{"annotations": []}'),
                            "dataset_coco.json: not a Karpathy split file: KeyError: 'images'"),
    "not-json": (lambda root: _karpathy(root, '{"images": ['), "dataset_coco.json: not a Karpathy split file"),
    "images-not-a-list": (lambda root: _karpathy(root, '{"images": {"a": 1}}'),
                          "dataset_coco.json: 'images' is not a list"),
    "entry-without-filename": (lambda root: _karpathy(root, '{"images": [{"split": "test", "sentences": []}]}'),
                               "dataset_coco.json: images[0] is not a Karpathy entry"),
    "sentence-without-raw": (lambda root: _karpathy(root, json.dumps({"images": [
        {"split": "test", "filename": "a.png", "sentences": [{"tokens": ["a"]}]}]})),
                             "dataset_coco.json: images[0] is not a Karpathy entry"),
    "missing-image": (lambda root: _karpathy(root, json.dumps({"images": [
        {"split": "test", "filename": "gone.png", "sentences": []}]})), "the image of 'gone.png' is missing: "),
    "undecodable-file": (lambda root: (write_imagefolder(root, "", [(b"GIF89a nope", 0)], ["a"]),
                                       f"file://{root}")[1], "the image of 'a/0.png' is undecodable image"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_eval_sets_are_named_on_one_line(tmp_path, case):
    build, message = MALFORMED[case]
    url = build(tmp_path / "set")
    with pytest.raises(DataError) as error:
        _read(open_eval_set(url))
    assert message in str(error.value) and str(tmp_path / "set") in str(error.value)
    assert "\n" not in str(error.value)
