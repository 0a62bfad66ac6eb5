"""Test collection: ``tests/mpi`` runs only under mpiexec (``tests/test_distributed.py`` launches it)."""

import os

collect_ignore = [] if os.environ.get("LONGNET_REF_MPI") == "1" else ["mpi"]
