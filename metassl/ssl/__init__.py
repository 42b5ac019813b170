"""Self-supervised learning: batched image views and SSL losses."""
