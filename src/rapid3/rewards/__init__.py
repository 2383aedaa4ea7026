"""Everything that scores an image: the compute-discounted reward and its terms (``composite``), image
metrics against a reference (``metrics``: PSNR, SSIM, Fréchet distance), discriminators
(``discriminator``: the protocol and the embedded conv net), the embedded world's reward model
(``embedded_reward``; its training program apart, ``train_embedded_reward``), what the scorers share
(``shared``: the image check, the class-balanced loss) and CLIP rewards for real pipelines (``clip``:
``CLIPScore``, ``CLIPAdapterDiscriminator``). Submodules are imported by name: ``clip`` loads transformers'
CLIP classes, which the embedded world never needs."""
