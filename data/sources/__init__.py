"""Where training samples come from: the data section of a config (config.py), the sources it names (core.py: image
folders, the synthetic captioned shapes, the registry and collate; hf_source.py; webdataset_source.py; latent_cache.py,
read back by any trainer), the image transforms every source shares (transforms.py), and colour_check.py, which reads a
shapes image's colours back to judge a model of the toy world."""
