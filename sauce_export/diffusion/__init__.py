"""SAeUron on text-to-image diffusion UNets: the diffusion world, its shipped pipeline and judge,
UNet sites and the feature edit, the stages, the LoRA fold and the diffusers export (docs/diffusion.md)."""
