"""nst-batch: batch neural style transfer. Data flows manifest -> plan -> ledger -> engine -> drive
(outputs and loss log) -> status/report; cli on top. README "How it works" maps the modules."""

import os

# OpenMP threads that spin while waiting make PyTorch's CPU kernels 10x slower as soon as another
# process wants a core (measured: 125 s instead of 11.5 s for one 128 px pair on 2 busy cores).
# An overnight batch shares its machine, so wait passively. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
