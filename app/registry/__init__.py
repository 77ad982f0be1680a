"""Task name -> task memory: the store interface and its stores, and the registry with its parts."""
