"""Models that ship with naflow_fx: the embedded shapes ResNet and its training recipe."""
