"""The normalize stage and the normalization modes as pure functions."""
