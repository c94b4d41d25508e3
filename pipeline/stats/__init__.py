"""The stats stage: exact integer moments, the stats documents, incremental fits."""
