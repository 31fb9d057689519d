"""Datasets: mask utilities, the synthetic shapes set, the streaming Parquet source and converters."""
