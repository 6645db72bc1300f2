"""Model access: loading from the hub or a folder, random-weight pipelines, rendering and the families."""
