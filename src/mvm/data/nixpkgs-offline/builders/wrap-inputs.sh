# Put the programs of runCommand's inputs ($inputDirs) on PATH. A dynamic ELF program of a
# package copied from Debian runs through the package's own ELF interpreter and libraries (the
# build sandbox has no /lib64); anything else is linked as it is. The first input wins.
wrapped="$TMPDIR/.inputs-bin"
mkdir -p "$wrapped"
elf=$(printf '\177ELF')
self=$(readlink /proc/$$/exe)
for p in $inputDirs; do
  for f in "$p"/bin/*; do
    if [ ! -e "$f" ]; then continue; fi
    n=${f##*/}
    if [ -e "$wrapped/$n" ] || [ -L "$wrapped/$n" ]; then continue; fi
    if [ -e "$p/lib64/ld-linux-x86-64.so.2" ] && [ "$(head -c 4 "$f")" = "$elf" ]; then
      printf '#!%s sh\nexec %s --library-path %s %s "$@"\n' "$self" \
        "$p/lib64/ld-linux-x86-64.so.2" "$p/lib/x86_64-linux-gnu" "$f" > "$wrapped/$n"
      chmod +x "$wrapped/$n"
    else
      ln -s "$f" "$wrapped/$n"
    fi
  done
done
export PATH="$wrapped"
