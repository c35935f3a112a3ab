"""Image-to-image tasks (paper §4.4): tasks, the autoencoder probe, the distance study with its
transfer-affinity baseline."""
