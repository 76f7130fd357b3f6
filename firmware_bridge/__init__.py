"""Serial transport, protocol codecs, device register maps, bus scheduling and simulated meters."""
