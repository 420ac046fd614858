"""Training the memory: episodes, their rendering, the loss and step, the loop."""
