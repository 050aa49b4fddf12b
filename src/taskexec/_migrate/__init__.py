"""``taskexec migrate``: a codemod that moves ``taskexec.sync`` call sites to ``await``.

Modules, in the order a migration runs: :mod:`.discover` parses the files and notes the facts,
:mod:`.flow` follows values to the objects of ``taskexec.sync`` classes and the calls between
the given files, :mod:`.decide` decides what moves and what stays sync (and why),
:mod:`.rewrite` changes the sources, :mod:`.report` prints the report or the diff,
:mod:`.trace` reads the call sites recorded at run time, and :mod:`.command` is the command.
Only :mod:`.command` is imported without libcst installed.
"""
