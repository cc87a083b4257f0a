"""Ingest of hostile sources: table cells that point outside the source or at the network, oversized and bomb
samples, corrupt shards among good ones, duplicate keys, a caption that would fill memory, and bad output names.

Every bad sample must be skipped with its reason in the manifest, never fetched, never fatal to the ingest.
"""

import gzip
import io
import json
import random
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import MAX_PIXELS, ingest_options, jpeg, make_corpus, stored_samples
from PIL import Image
from services import loopback_http as serve_loopback_http

from pipelines.cli import main
from trainer.data.ingest import IngestIncomplete, ingest
from trainer.data.loader import DataError


def _reasons(manifest: dict) -> dict[str, str]:
    return {k["key"]: k["reason"] for k in manifest["skipped_keys"]}


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels: a decompression bomb if decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buffer, format="GIF")
    return buffer.getvalue()


def _noisy_jpeg(size: int) -> bytes:
    rng = random.Random(size)
    image = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


@pytest.fixture
def loopback_http():
    """A real HTTP server on 127.0.0.1 standing in for a metadata endpoint; yields (port, requests it got)."""
    with serve_loopback_http(jpeg(99)) as served:
        yield served


def _confinement_source(tmp: Path, fmt: str, port: int) -> tuple[dict[str, str], dict[str, str]]:
    """A table whose image cells point everywhere; returns (good key -> caption, bad key -> reason)."""
    src = tmp / "src"
    (src / "images").mkdir(parents=True)
    for folder, name in (("", "outside.jpg"), ("src2", "evil.jpg"), ("shared", "ok.jpg"), ("shared2", "no.jpg")):
        (tmp / folder).mkdir(exist_ok=True)
        (tmp / folder / name).write_bytes(jpeg(len(name)))
    for i in range(5):
        (src / "images" / f"g{i}.jpg").write_bytes(jpeg(10 + i))
    good = {"good-relative": "images/g0.jpg", "good-absolute": f"{src}/images/g1.jpg",
            "good-file-url": f"file://{src}/images/g2.jpg", "good-dotdot-inside": "images/../images/g3.jpg",
            "good-allowed-prefix": f"file://{tmp}/shared/ok.jpg", "good-double-slash": "images//g4.jpg"}
    bad = {"bad-traversal": "../outside.jpg", "bad-deep-traversal": "images/../../outside.jpg",
           "bad-prefix-trick": "../src2/evil.jpg", "bad-prefix-trick-absolute": f"{tmp}/src2/evil.jpg",
           "bad-etc-passwd": "/etc/passwd", "bad-file-etc-passwd": "file:///etc/passwd",
           "bad-file-url-escape": f"file://{src}/../outside.jpg", "bad-relative-file-url": "file://images/g0.jpg",
           "bad-allowed-prefix-trick": f"file://{tmp}/shared2/no.jpg",
           "bad-metadata": f"http://127.0.0.1:{port}/latest/meta-data/iam/security-credentials/role",
           "bad-https": f"https://127.0.0.1:{port}/x.jpg", "bad-gopher": f"gopher://127.0.0.1:{port}/x",
           "bad-unknown-scheme": "unknownscheme://host/x.jpg", "bad-chain": f"images/g0.jpg::http://127.0.0.1:{port}/",
           "bad-other-bucket": "gs://someone-elses-bucket/x.jpg", "bad-source-itself": "."}
    rows = [(key, cell, f"caption of {key}") for key, cell in {**good, **bad}.items()]
    if fmt == "csv":
        with open(src / "part-0.csv", "w", newline="") as handle:
            handle.write("key,image,caption\n")
            for row in rows:
                handle.write(",".join(f'"{v}"' for v in row) + "\n")
    else:
        pq.write_table(pa.table({"key": [r[0] for r in rows], "image": [r[1] for r in rows],
                                 "caption": [r[2] for r in rows]}), src / "part-0.parquet")
    return {k: f"caption of {k}" for k in good}, dict.fromkeys(bad, "forbidden_path")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_cells_name_only_files_under_the_source_root_or_an_allowed_prefix(fmt, tmp_path, loopback_http):
    port, requests = loopback_http
    good, bad = _confinement_source(tmp_path, fmt, port)
    options = ingest_options(fmt, allowed_prefixes=(f"file://{tmp_path}/shared",))
    manifest = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out", options)
    assert requests == []  # nothing was fetched, not even from loopback
    assert {k: s["caption"] for k, s in stored_samples(tmp_path / "out").items()} == good
    assert _reasons(manifest) == bad
    assert all(k["detail"] for k in manifest["skipped_keys"])
    assert manifest["counts"]["skipped"] == {"forbidden_path": len(bad)}
    # without the prefix, the same cell is forbidden like any other outside path
    plain = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out-plain", ingest_options(fmt))
    assert _reasons(plain) == {**bad, "good-allowed-prefix": "forbidden_path"}
    assert requests == []


def test_hugging_face_image_structs_prefer_bytes_and_confine_paths(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "outside.jpg").write_bytes(jpeg(1))
    (tmp_path / "src" / "images" / "in.jpg").write_bytes(jpeg(2))
    images = [{"bytes": jpeg(3), "path": "../outside.jpg"}, {"bytes": None, "path": "../outside.jpg"},
              {"bytes": None, "path": "images/in.jpg"}, {"bytes": None, "path": "/etc/passwd"}]
    pq.write_table(pa.table({"key": ["inline", "outside", "inside", "passwd"], "image": images,
                             "caption": ["one", "two", "three", "four"]}), tmp_path / "src" / "part-0.parquet")
    manifest = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out", ingest_options("parquet"))
    stored = stored_samples(tmp_path / "out")
    assert {k: s["caption"] for k, s in stored.items()} == {"inline": "one", "inside": "three"}
    assert _reasons(manifest) == {"outside": "forbidden_path", "passwd": "forbidden_path"}


def test_allowed_prefixes_must_be_storage_folders(tmp_path):
    make_corpus("csv", tmp_path / "src", shards=1, per_shard=1)
    for prefix in ("http://127.0.0.1/", "file://relative/x", "file:///", "ftp://host/x"):
        with pytest.raises(DataError, match="--allow-prefix"):
            ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out",
                   ingest_options("csv", allowed_prefixes=(prefix,)))
    assert not (tmp_path / "out").exists()


def test_oversized_bombs_foreign_formats_and_control_characters_are_judged(tmp_path):
    (tmp_path / "src").mkdir()
    big = _noisy_jpeg(64)
    assert len(big) > 4000
    members = [("ok.jpg", jpeg(1)), ("ok.txt", b"fine"),
               ("long-caption.jpg", jpeg(2)), ("long-caption.txt", b"w" * 101),
               ("big-image.jpg", big), ("big-image.txt", b"a big picture"),
               ("png-bomb.png", _png_header(100_000, 100_000)), ("png-bomb.txt", b"ten gigapixels"),
               ("png-large.png", _png_header(5000, 5000)), ("png-large.txt", b"25 megapixels"),
               ("gif.jpg", _gif()), ("gif.txt", b"a gif named .jpg"),
               ("eps.jpg", EPS), ("eps.txt", b"postscript named .jpg"),
               ("controls.jpg", jpeg(3)), ("controls.txt", b"a\x00b\tc\x7f d\x1b[31m e \xc2\x85f\r\n"),
               ("dup.jpg", jpeg(4)), ("dup.txt", b"first dup"),
               ("other.jpg", jpeg(5)), ("other.txt", b"between"),
               ("dup.jpg", jpeg(6)), ("dup.txt", b"second dup"),
               ("caf\udce9.jpg", jpeg(7)), ("caf\udce9.txt", b"a member name that is not UTF-8")]
    _tar(tmp_path / "src" / "00000.tar", members)
    options = ingest_options("webdataset", max_caption_bytes=100, max_image_bytes=4000)
    manifest = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out", options)
    assert _reasons(manifest) == {"long-caption": "oversized", "big-image": "oversized", "png-bomb": "oversized",
                                  "png-large": "oversized", "gif": "undecodable", "eps": "undecodable",
                                  "dup": "duplicate_key", "caf\udce9": "non_utf8_key"}
    details = {k["key"]: k["detail"] for k in manifest["skipped_keys"]}
    assert "cannot identify" in details["eps"]  # PIL never tried its EPS plugin (nor Ghostscript)
    stored = {k: s["caption"] for k, s in stored_samples(tmp_path / "out").items()}
    assert stored == {"ok": "fine", "controls": "a b c d [31m e f", "dup": "first dup", "other": "between"}


def test_csv_records_and_image_files_are_read_within_the_limits(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "ok.jpg").write_bytes(jpeg(1))
    (src / "images" / "big.jpg").write_bytes(_noisy_jpeg(64))
    with open(src / "part-0.csv", "w", newline="") as handle:
        handle.write("key,image,caption\n")
        handle.write("a,images/ok.jpg,first\n")
        handle.write(f"huge-row,images/ok.jpg,{'z' * 300_000}\n")  # over the record bound: never held whole
        handle.write(f'huge-quoted,images/ok.jpg,"{"q" * 150_000}\n{"q" * 150_000}"\n')
        handle.write("b,images/big.jpg,too big a file\n")
        handle.write(f"long,images/ok.jpg,{'w' * 200}\n")
        handle.write("c,images/ok.jpg,last\n")
    options = ingest_options("csv", max_caption_bytes=100, max_image_bytes=4000)
    manifest = ingest(f"file://{src}", f"file://{tmp_path}/out", options)
    assert {k: s["caption"] for k, s in stored_samples(tmp_path / "out").items()} == {"a": "first", "c": "last"}
    assert _reasons(manifest) == {"part-0-00000001": "oversized", "part-0-00000002": "oversized",
                                  "b": "oversized", "long": "oversized"}


def _cut_at_member_boundary(data: bytes) -> bytes:
    """The tar without its end-of-archive blocks, as a download cut between two members would leave it."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return data[:last.offset_data + -(-last.size // 512) * 512]


def test_corrupt_shards_are_recorded_as_failed_and_a_rerun_completes_the_corpus(tmp_path, capsys):
    expected = make_corpus("webdataset", tmp_path / "src", shards=6, per_shard=3)
    src, out = tmp_path / "src", tmp_path / "out"
    reference = ingest(f"file://{src}", f"file://{tmp_path}/clean", ingest_options("webdataset"))
    originals = {i: (src / f"0000{i}.tar").read_bytes() for i in (1, 2, 3, 5)}
    (src / "00001.tar").write_bytes(originals[1][: len(originals[1]) // 2 + 100])  # truncated mid-member
    (src / "00002.tar").write_bytes(random.Random(2).randbytes(20_000))  # not a tar at all
    (src / "00003.tar").write_bytes(gzip.compress(originals[3])[:-300])  # a truncated .tar.gz
    (src / "00005.tar").write_bytes(_cut_at_member_boundary(originals[5]))
    with pytest.raises(IngestIncomplete, match=r"4 of 6 input shards .* could not be read") as failure:
        ingest(f"file://{src}", f"file://{out}", ingest_options("webdataset"))
    assert all(name in str(failure.value) for name in ("00001", "00002", "00003", "00005"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["input"] for f in manifest["failed"]] == ["00001", "00002", "00003", "00005"]
    assert all(f["error"] and "\n" not in f["error"] for f in manifest["failed"])
    assert [i["input"] for i in manifest["inputs"]] == ["00000", "00004"]
    assert not (out / "train" / "00001").exists()
    good = {k for k in expected["good"] if k.startswith(("00000", "00004"))}
    assert set(stored_samples(out)) == good and manifest["counts"]["written"] == len(good)
    assert _reasons(manifest) == expected["bad"]  # shard 0's bad samples are still counted
    # the CLI says the same in one error line (after its progress bars), with status 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["data", "ingest", str(src), "--format", "webdataset", "--out", str(out), "--resize", "32",
              "--max-pixels", str(MAX_PIXELS)])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maeclip: error:")]
    assert len(errors) == 1 and "4 of 6 input shards" in errors[0], errors
    stamp = (out / "train" / "00000" / "done.json").stat().st_mtime_ns
    for i, data in originals.items():
        (src / f"0000{i}.tar").write_bytes(data)
    rerun = ingest(f"file://{src}", f"file://{out}", ingest_options("webdataset"))
    assert "failed" not in rerun and "failed" not in json.loads((out / "manifest.json").read_text())
    assert (out / "train" / "00000" / "done.json").stat().st_mtime_ns == stamp  # only the failed ones redone
    assert rerun["shards"] == reference["shards"] and rerun["counts"] == reference["counts"]
    assert set(stored_samples(out)) == set(expected["good"])


def _dup_source(root: Path) -> None:
    root.mkdir(parents=True)
    layout = {"00000": ["a", "b", "c"], "00001": ["b", "d", "x", "d"], "00002": ["a", "e", "b-dup1"]}
    for shard, keys in layout.items():
        members = []
        for i, key in enumerate(keys):
            members += [(f"{key}.jpg", jpeg(int(shard) * 10 + i)), (f"{key}.txt", f"{key} of {shard} #{i}".encode())]
        _tar(root / f"{shard}.tar", members)


@pytest.mark.parametrize("policy", ["skip", "suffix"])
def test_duplicate_keys_follow_the_policy_whatever_the_workers(policy, tmp_path):
    _dup_source(tmp_path / "src")
    options = ingest_options("webdataset", duplicate_keys=policy)
    one = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/one", options)
    two = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/two", options, workers=2)
    assert one["shards"] == two["shards"] and one["counts"] == two["counts"]
    stored = {k: s["caption"] for k, s in stored_samples(tmp_path / "one").items()}
    first = {"a": "a of 00000 #0", "b": "b of 00000 #1", "c": "c of 00000 #2", "d": "d of 00001 #1",
             "x": "x of 00001 #2", "e": "e of 00002 #1"}
    if policy == "skip":
        assert stored == {**first, "b-dup1": "b-dup1 of 00002 #2"}
        assert [(k["input"], k["key"], k["reason"]) for k in one["skipped_keys"]] == [
            ("00001", "b", "duplicate_key"), ("00001", "d", "duplicate_key"), ("00002", "a", "duplicate_key")]
    else:
        assert stored == {**first, "b-dup1": "b of 00001 #0", "d-dup1": "d of 00001 #3", "a-dup1": "a of 00002 #0",
                          "b-dup1-dup1": "b-dup1 of 00002 #2"}
        assert one["counts"]["renamed"] == 4 and one["skipped_keys"] == []
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "one" / "train").glob("*/done.json"))]
    assert ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/one", options) == one
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "one" / "train").glob("*/done.json"))] == stamps


def test_an_earlier_shard_read_on_rerun_takes_its_keys_back(tmp_path):
    _dup_source(tmp_path / "src")
    options = ingest_options("webdataset", duplicate_keys="suffix")
    reference = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/clean", options)
    good = (tmp_path / "src" / "00000.tar").read_bytes()
    (tmp_path / "src" / "00000.tar").write_bytes(good[:700])
    with pytest.raises(IngestIncomplete):
        ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out", options)
    assert "b" in stored_samples(tmp_path / "out")  # shard 00001 holds the first readable "b" for now
    (tmp_path / "src" / "00000.tar").write_bytes(good)
    rerun = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out", options)
    assert rerun["shards"] == reference["shards"] and rerun["renamed_keys"] == reference["renamed_keys"]


MEMORY_MARGIN_MIB = 200


def test_a_small_gzip_tar_holding_a_300_mib_caption_is_skipped_in_bounded_memory(tmp_path):
    """Peak RSS of the ingesting process may exceed its RSS after imports (torch alone is hundreds of MiB) by
    MEMORY_MARGIN_MIB; reading the caption whole would cost 300 MiB and decoding it as much again."""
    (tmp_path / "src").mkdir()

    class Bytes(io.RawIOBase):  # 300 MiB of one byte, never held in memory
        def __init__(self, size: int) -> None:
            self.left = size

        def readinto(self, buffer) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = b"x" * n
            self.left -= n
            return n

    with tarfile.open(tmp_path / "src" / "00000.tar", "w:gz", compresslevel=9) as tar:
        for name, data in (("ok.jpg", jpeg(1)), ("ok.txt", b"fine"), ("huge.jpg", jpeg(2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("huge.txt")
        info.size = 300 << 20
        tar.addfile(info, Bytes(info.size))
    assert (tmp_path / "src" / "00000.tar").stat().st_size < 1 << 20
    # The child measures itself, so no other process of this test run can inflate the figure; the kernel's
    # high-water mark is reset after the imports (clear_refs 5), so an import-time peak does not count either.
    script = textwrap.dedent(f"""
        import json
        from trainer.data.ingest import IngestOptions, ingest
        def status_mib(field):
            with open("/proc/self/status") as f:
                line = next(line for line in f if line.startswith(field + ":"))
            return int(line.split()[1]) / 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_mib("VmRSS")
        manifest = ingest("file://{tmp_path}/src", "file://{tmp_path}/out", IngestOptions(format="webdataset"))
        peak = status_mib("VmHWM")
        print(json.dumps({{"before": before, "peak": peak, "skipped": manifest["skipped_keys"]}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"RSS after imports {report['before']:.0f} MiB, peak {report['peak']:.0f} MiB")
    assert [(k["key"], k["reason"]) for k in report["skipped"]] == [("huge", "oversized")]
    assert report["peak"] - report["before"] < MEMORY_MARGIN_MIB, report


@pytest.mark.parametrize("split", ["../../x", "a/b", "", ".", "..", "x" * 65, "tr ain", "-x", "/abs"])
def test_split_names_are_checked_before_anything_is_written(split, tmp_path):
    make_corpus("csv", tmp_path / "src", shards=1, per_shard=1)
    with pytest.raises(DataError, match="--split"):
        ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/a/b/out", ingest_options("csv", split=split))
    assert not (tmp_path / "a").exists()


def test_cli_refuses_a_split_that_climbs_out_with_status_2(tmp_path, capsys):
    make_corpus("csv", tmp_path / "src", shards=1, per_shard=1)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        main(["data", "ingest", str(tmp_path / "src"), "--format", "csv", "--out",
              str(tmp_path / "deep" / "er" / "out"), "--split", "../../x"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maeclip: error: --split"), lines
    assert sorted(p for p in tmp_path.rglob("*")) == before
