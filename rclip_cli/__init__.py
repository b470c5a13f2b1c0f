"""rclip_cli: the `rclip` command line (Click commands that call rclip_core)."""
