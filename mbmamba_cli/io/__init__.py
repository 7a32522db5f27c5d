"""Image files and input/output paths.

`images` reads and writes photos (PNG, JPEG, TIFF, BMP, WebP) keeping mode, bit depth,
alpha, ICC profile and EXIF; `paths` collects inputs and names outputs. Import from those
modules: this package does not import them, so that `mbmamba --help` loads no image codecs.
"""
