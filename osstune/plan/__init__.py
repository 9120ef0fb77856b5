"""`osstune plan`: predict memory and speed of training and serving configurations for the user's
GPUs, pick one, and write it as a recipe. Reads config and model shapes (meta device); never runs a
model. docs/PLANNING.md explains every term."""
