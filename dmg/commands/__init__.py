"""``python -m dmg <command>`` entry points: thin layers that parse arguments and call the package."""
