"""Generation: `scoretk sample`, from a trained model into an HDF5 sample file."""
