"""The runtime: the cache a model reads (layers and stores), latent attention, decode, generation."""
