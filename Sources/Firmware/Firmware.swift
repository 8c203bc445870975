import VMCore
