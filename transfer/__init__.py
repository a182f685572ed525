"""ssld-kit transfer: fine-tunes student artifacts on the ten small classification datasets."""
