"""``python -m rclip_cli`` (also what torchrun launches: ``torchrun -m rclip_cli pretrain ...``)."""

from rclip_cli.main import main

if __name__ == "__main__":
    main()
