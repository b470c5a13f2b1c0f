"""One module per `rclip` subcommand."""
