"""The subcommands of ``fisher-fast`` (:mod:`fisher_fast.cli`), one module each: ``info``,
``distance`` (its image-to-image branch in :mod:`~fisher_fast.commands.dense`), ``dictionary``,
``search`` and ``demo``. Each module's ``add_parser`` registers its command; the options and
helpers several commands share live in :mod:`~fisher_fast.commands.common`.

The commands sit on top of the library: they import :mod:`fisher_fast.pipeline` and
:mod:`fisher_fast.tasks`, and nothing in the library imports them."""
