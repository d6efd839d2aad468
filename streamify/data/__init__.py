"""Text sources for calibration, training and eval, and tokenization into blocks."""
