# A minimal `lib`: the handful of nixpkgs.lib functions small flakes tend to use.
let
  b = builtins;
in
rec {
  inherit (b)
    attrNames attrValues concatLists concatStringsSep elem elemAt filter foldl' genList head
    isAttrs isBool isFunction isInt isList isString length listToAttrs mapAttrs replaceStrings
    stringLength substring tail toJSON fromJSON;

  id = x: x;
  const = x: _: x;
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalString = cond: s: if cond then s else "";
  optionalAttrs = cond: as: if cond then as else { };
  concatMap = f: xs: b.concatLists (map f xs);
  concatStrings = concatStringsSep "";
  concatMapStrings = f: xs: concatStringsSep "" (map f xs);
  concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
  nameValuePair = name: value: { inherit name value; };
  mapAttrsToList = f: as: map (n: f n as.${n}) (attrNames as);
  filterAttrs = pred: as:
    listToAttrs (concatMap (n: if pred n as.${n} then [ (nameValuePair n as.${n}) ] else [ ]) (attrNames as));
  genAttrs = names: f: listToAttrs (map (n: nameValuePair n (f n)) names);
  recursiveUpdate = lhs: rhs:
    lhs // b.mapAttrs (n: v: if isAttrs v && lhs ? ${n} && isAttrs lhs.${n} then recursiveUpdate lhs.${n} v else v) rhs;
  hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
  hasSuffix = suf: s:
    let n = stringLength s; m = stringLength suf; in m <= n && substring (n - m) m s == suf;
  removePrefix = pre: s: if hasPrefix pre s then substring (stringLength pre) (-1) s else s;
  removeSuffix = suf: s: if hasSuffix suf s then substring 0 (stringLength s - stringLength suf) s else s;
  escapeShellArg = s: "'${replaceStrings [ "'" ] [ "'\\''" ] (toString s)}'";
  escapeShellArgs = xs: concatStringsSep " " (map escapeShellArg xs);
  makeSearchPath = sub: paths: concatStringsSep ":" (map (p: "${p}/${sub}") paths);
  makeBinPath = makeSearchPath "bin";
  getName = x: (b.parseDrvName (x.name or x)).name;
  getVersion = x: (b.parseDrvName (x.name or x)).version;
  getExe = p: "${p}/bin/${p.meta.mainProgram or (getName p)}";
  systems.flakeExposed = [ "x86_64-linux" ];
}
