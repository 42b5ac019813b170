"""Task generation: pseudo-labelled episodes from unlabelled images, Arrow/Parquet I/O, Ray actors."""
