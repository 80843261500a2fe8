"""The ``exitrl`` commands, one module each: ``add_parser(sub)`` adds the command's parser (its
handler set as ``fn``) to ``rl.cli``'s subparsers; the handlers import their work lazily."""
