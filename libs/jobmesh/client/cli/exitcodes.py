"""The exit codes of the ``jobmesh`` command, one meaning each, for scripts to branch on."""

EXIT_OK = 0  # done
EXIT_USAGE = 1  # a bad command line, or a request the cluster refused
EXIT_UNAVAILABLE = 2  # the cluster is unreachable or busy: the same command may work later
EXIT_FAILED = 3  # the job ran and did not succeed (``run``)
EXIT_NOT_FOUND = 4  # the job (or other thing) asked for does not exist
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
