"""``rclip quickstart`` behind its command (``rclip_cli/commands/quickstart.py``): :mod:`.plan`,
the stages as public ``rclip`` command lines, and :mod:`.report`, the report on their outputs."""
