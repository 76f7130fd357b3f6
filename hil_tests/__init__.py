"""Hardware-in-the-loop suite: the real controller against simulated meters on virtual serial ports,
a simulated plant and scheduled faults, in accelerated time. `python -m hil_tests --report DIR`."""
