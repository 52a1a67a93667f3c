{
  description = "My mvm worker image";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";
  };

  outputs = { self, nixpkgs }: let
    system = "x86_64-linux";
    pkgs = nixpkgs.legacyPackages.${system};
  in {
    packages.${system} = {
      minimal = pkgs.buildEnv {
        name = "mvm-minimal";
        paths = with pkgs; [ busybox curl ];
      };

      baseline = pkgs.buildEnv {
        name = "mvm-baseline";
        paths = with pkgs; [ bash coreutils curl wget openssl ];
      };

      python = pkgs.buildEnv {
        name = "mvm-python";
        paths = with pkgs; [ python3 python3Packages.pip bash coreutils ];
      };
    };
  };
}
