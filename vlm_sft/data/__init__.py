"""Data: Robo2VLM rows -> encoded examples -> host-precomputed batches."""
