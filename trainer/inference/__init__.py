"""Using a trained model on one process: load it from any checkpoint or a Hugging Face directory, decode,
evaluate."""
