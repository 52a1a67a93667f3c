# The package set. `versions` is versions.json (see flake.nix).
{ system, versions }:
let
  lib = import ./lib.nix;
  inherit (lib) concatStringsSep concatMapStringsSep mapAttrsToList elemAt;

  # The host files a package is made of, imported into the store by `mvm setup`
  # (mvm.build.offline_nixpkgs.import_host_files) as a content-addressed path: a fixed-output
  # derivation whose hash pins those bytes. Nix finds the path already valid and never runs the
  # builder, so a build reads nothing from the host; the builder only explains a missing import.
  hostFiles = entry: derivation {
    inherit system;
    inherit (entry.files) name;
    builder = "/mvm-setup-imports-the-offline-package-sets-host-files--run-mvm-setup";
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = entry.files.sha256;
    preferLocalBuild = true;
    allowSubstitutes = false;
  };

  # Debian busybox-static: one static binary, applets built in; every builder here runs it.
  busyboxBin = "${hostFiles versions.packages.busybox}/bin/busybox";
  py = versions.python.version; # e.g. "3.11"

  # A derivation whose builder is `busybox sh -c <script>`. Every other argument goes into the
  # environment, except meta and passthru, which are attached to the result as in nixpkgs.
  mkDerivation = { name, script, meta ? { }, passthru ? { }, ... }@args:
    let
      drv = derivation (removeAttrs args [ "script" "meta" "passthru" ] // {
        inherit name system;
        builder = busyboxBin;
        args = [ "sh" "-c" ("set -eu\n" + script) ];
      });
    in
    drv // passthru // { inherit meta; };

  # Run a program of a package copied from Debian inside the build sandbox, which has no
  # /lib64/ld-linux-x86-64.so.2: through the package's own copy of the ELF interpreter.
  runIn = pkg: "${pkg}/lib64/ld-linux-x86-64.so.2 --library-path ${pkg}/lib/x86_64-linux-gnu";

  # A package copied from the host's Debian packages, as described by versions.json.
  debianPackage = { pname, entry ? versions.packages.${pname}, postInstall ? "", propagate ? [ ]
                  , env ? { }, meta ? { }, passthru ? { } }:
    mkDerivation (env // {
      name = "${pname}-${entry.version}";
      src = hostFiles entry;
      # provenance (the bytes are pinned by src's hash): `nix derivation show` names them
      debianVersions = concatStringsSep "\n" (mapAttrsToList (pkg: v: "${pkg} ${v}") entry.debian);
      propagated = toString propagate;
      script = builtins.readFile ./builders/debian.sh + "\n" + postInstall;
      passthru = { pname = pname; version = entry.version; debian = entry.debian; } // passthru;
      meta = { description = "${pname} copied from the host's Debian packages"; } // meta;
    });

  # Other nixpkgs arguments (checkPhase, meta, allowSubstitutes, ...) are accepted and ignored.
  writeTextFile = { name, text, executable ? false, destination ? "", propagate ? [ ], ... }:
    mkDerivation {
      inherit name text destination;
      executable = if executable then "1" else "";
      propagated = toString propagate;
      passAsFile = [ "text" ];
      script = ''
        target="$out$destination"
        mkdir -p "$(dirname "$target")"
        cp "$textPath" "$target"
        if [ -n "$executable" ]; then chmod +x "$target"; fi
        if [ -n "$propagated" ]; then
          mkdir -p "$out/nix-support"
          printf '%s\n' $propagated > "$out/nix-support/propagated-user-env-packages"
        fi
      '';
    };

  buildEnv =
    { name
    , paths
    , ignoreCollisions ? false
    , postBuild ? ""
    , meta ? { }
    , passthru ? { }
      # accepted for compatibility with nixpkgs and ignored: everything under "/" is linked,
      # no extra outputs exist, contents of colliding files are always compared
    , pathsToLink ? [ "/" ]
    , extraOutputsToInstall ? [ ]
    , extraPrefix ? ""
    , checkCollisionContents ? true
    , ignoreSingleFileOutputs ? false
    , manifest ? ""
    , includeClosures ? false
    , buildInputs ? [ ]
    , nativeBuildInputs ? [ ]
    }:
    let
      prio = p: (p.meta or { }).priority or 5;
      sorted = builtins.sort (a: b: prio a < prio b) paths; # stable: equal priorities keep order
    in
    mkDerivation {
      inherit name postBuild meta;
      pkgList = concatMapStringsSep "\n" (p: "${toString (prio p)} ${p}") sorted;
      ignoreCollisions = if ignoreCollisions then "1" else "";
      script = builtins.readFile ./builders/buildenv.sh;
      passthru = { inherit paths; } // passthru;
    };

  # runCommand: the script runs under busybox sh (`set -eu`) with all busybox applets, plus the
  # bin/ of buildInputs and nativeBuildInputs on PATH. Other attributes become environment.
  # The sandbox has no /lib64/ld-linux-x86-64.so.2, so a program copied from Debian is reached
  # through a wrapper that runs it with its package's own ELF interpreter and libraries.
  runCommand = name: env: script:
    let
      inputs = (env.nativeBuildInputs or [ ]) ++ (env.buildInputs or [ ]);
    in
    mkDerivation (removeAttrs env [ "nativeBuildInputs" "buildInputs" ] // {
      inherit name;
      inputDirs = toString inputs;
      PATH = "/path-not-set";
      script = builtins.readFile ./builders/wrap-inputs.sh + "\n" + script;
    });

  cacert = debianPackage {
    pname = "cacert";
    postInstall = ''
      ln -s ca-certificates.crt "$out/etc/ssl/certs/ca-bundle.crt"
      mkdir -p "$out/usr/lib/ssl"
      ln -s ../../../etc/ssl/certs/ca-certificates.crt "$out/usr/lib/ssl/cert.pem"
    '';
    meta.description = "CA bundle at /etc/ssl/certs/ca-certificates.crt and OpenSSL's default cert.pem";
  };

  busybox = debianPackage {
    pname = "busybox";
    postInstall = ''
      cd "$out"
      "$out/bin/busybox" --list-full | while read -r p; do
        n=''${p##*/}
        case "$p" in
          bin/*|usr/bin/*) d=bin; t=busybox ;;
          sbin/*|usr/sbin/*) d=sbin; t=../bin/busybox ;;
          *) continue ;;
        esac
        mkdir -p "$d"
        if [ ! -e "$d/$n" ] && [ ! -L "$d/$n" ]; then ln -s "$t" "$d/$n"; fi
      done
    '';
    # like nixpkgs: coreutils, bash etc. win collisions against busybox applets
    meta = { priority = 15; mainProgram = "busybox"; };
  };

  bash = debianPackage {
    pname = "bash";
    postInstall = ''ln -s bash "$out/bin/sh"'';
    meta.mainProgram = "bash";
  };

  coreutils = debianPackage { pname = "coreutils"; };

  curl = debianPackage { pname = "curl"; propagate = [ cacert ]; meta.mainProgram = "curl"; };

  wget = debianPackage { pname = "wget"; propagate = [ cacert ]; meta.mainProgram = "wget"; };

  openssl = debianPackage { pname = "openssl"; propagate = [ cacert ]; meta.mainProgram = "openssl"; };

  python3 = debianPackage {
    pname = "python3";
    propagate = [ cacert ];
    # The interpreter finds its prefix from the realpath of its binary: this store path, whose
    # lib/pythonX.Y is the stdlib. Bytecode is compiled here with hash-based, unchecked pycs,
    # since the store is read-only and its timestamps are normalised.
    postInstall = ''
      cd "$out/bin"
      ln -s python${py} python3
      ln -s python${py} python
      ${runIn "$out"} "$out/bin/python${py}" -I -m compileall -q -j "''${NIX_BUILD_CORES:-1}" \
        --invalidation-mode unchecked-hash -x 'bad_coding|badsyntax|lib2to3/tests/data' \
        "$out/lib/python${py}" > "$TMPDIR/compile.log" || { cat "$TMPDIR/compile.log" >&2; exit 1; }
    '';
    meta.mainProgram = "python3";
    passthru = {
      pythonVersion = py;
      sitePackages = "lib/python${py}/site-packages";
      executable = "python${py}";
      pkgs = python3Packages;
    };
  };

  python3Packages = {
    python = python3;
    # pip on its own store path, with bin/pip a small script that puts it on sys.path and runs
    # it with python3 (which a profile holding pip gets through propagation, as in nixpkgs).
    pip = debianPackage {
      pname = "python${py}-pip";
      entry = versions.packages.pip;
      propagate = [ python3 ];
      env = { python = python3; };
      postInstall = ''
        site="$out/lib/python3/dist-packages"
        ${runIn python3} "$python/bin/python${py}" -I -m compileall -q -j "''${NIX_BUILD_CORES:-1}" \
          --invalidation-mode unchecked-hash "$site" > "$TMPDIR/compile.log" || { cat "$TMPDIR/compile.log" >&2; exit 1; }
        mkdir -p "$out/bin"
        {
          echo "#!$python/bin/python${py}"
          echo "import sys"
          echo "sys.path.insert(0, '$site')"
          echo "from pip._internal.cli.main import main"
          echo "if __name__ == '__main__':"
          echo "    sys.argv[0] = 'pip'"
          echo "    sys.exit(main())"
        } > "$out/bin/pip"
        chmod +x "$out/bin/pip"
        ln -s pip "$out/bin/pip3"
        ln -s pip "$out/bin/pip${py}"
      '';
      meta.mainProgram = "pip";
    };
  };

  writeText = name: text: writeTextFile { inherit name text; };
  writeTextDir = path: text: writeTextFile {
    inherit text;
    name = builtins.baseNameOf path;
    destination = "/${path}";
  };
  writeScript = name: text: writeTextFile { inherit name text; executable = true; };
  writeScriptBin = name: text: writeTextFile {
    inherit name text;
    executable = true;
    destination = "/bin/${name}";
  };
  # The shell is bash from this set; it is propagated so a profile holding the script also
  # holds bash and the libraries it loads.
  writeShellScript = name: text: writeTextFile {
    inherit name;
    text = "#!${bash}/bin/bash\n" + text;
    executable = true;
    propagate = [ bash ];
  };
  writeShellScriptBin = name: text: writeTextFile {
    inherit name;
    text = "#!${bash}/bin/bash\n" + text;
    executable = true;
    destination = "/bin/${name}";
    propagate = [ bash ];
  };
  pyAttr = "python" + lib.replaceStrings [ "." ] [ "" ] py; # e.g. python311
in
{
  inherit lib system buildEnv runCommand writeTextFile writeText writeTextDir writeScript
    writeScriptBin writeShellScript writeShellScriptBin
    bash busybox cacert coreutils curl openssl python3 python3Packages wget;
  symlinkJoin = { name, paths, postBuild ? "", ... }:
    buildEnv { inherit name paths postBuild; ignoreCollisions = true; };
  runCommandLocal = runCommand;
  runCommandNoCC = runCommand;
  runtimeShell = "${bash}/bin/bash";
  ${pyAttr} = python3;
  "${pyAttr}Packages" = python3Packages;
}
