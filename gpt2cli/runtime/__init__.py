"""Where the code runs: devices, torchrun, compile policy, bandwidth, atomic files, optional extras."""
