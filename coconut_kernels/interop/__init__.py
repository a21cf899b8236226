"""Coming from the official COCONUT code (facebookresearch/coconut) and going to Hugging Face: the latent
markers in the official order (`markers`), the official YAML configs and `checkpoint_N` files
(`official`), and export to a `transformers` folder (`hf_export`).
"""
