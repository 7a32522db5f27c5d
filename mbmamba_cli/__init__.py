"""mbmamba: motion deblurring with MBMamba, a Mamba network with a memory buffer."""

__version__ = "0.1.0"
