"""Text-to-image foundations (issue 32): a local CLIP tokenizer, the tiny Stable-Diffusion stack of stock diffusers and
transformers classes, and the check of a user's ``StableDiffusionPipeline`` folder."""
