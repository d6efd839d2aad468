"""INT4 weights (W4A16): the grid, RTN, GPTQ, AWQ, calibration, the stage and its writers."""
