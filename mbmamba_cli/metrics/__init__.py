"""Image-quality metrics and the `mbmamba eval` runner: PSNR, SSIM, scoring protocols, pairing."""
