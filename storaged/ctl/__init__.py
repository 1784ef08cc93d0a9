"""storagectl, the admin CLI (console script ``storagectl = storaged.ctl.cli:main``): the
parser and commands (cli), send/receive (portable), image import/export through qemu-img
(image), the blocking control client (client), the progress bar and shell completion.
Standard library only at start-up: nothing here imports the daemon, trio or the lower
layers (the import contract "storagectl never loads the daemon" in pyproject.toml).
"""
