"""Task name -> task memory: the store interface, the local-folder store and the registry."""
