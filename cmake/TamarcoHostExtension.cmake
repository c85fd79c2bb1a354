# tamarco_add_extension(NAME SOURCES src... [LIBRARIES lib...]
#                       [INCLUDE_DIRECTORIES dir...] [OUTPUT_DIRECTORY dir])
#
# Builds NAME.so, a shared object `require "NAME"` loads (it must define
# `int luaopen_NAME(lua_State *L)`; dots in a module name become '_') and
# that LuaJIT's FFI can ffi.load. It is not linked against LuaJIT, libuv or
# the host: the tamarco-host binary exports those symbols and the dynamic
# linker resolves them when the host loads the module.
#
# The file lands in OUTPUT_DIRECTORY, else ${TAMARCO_EXTENSION_OUTPUT_DIRECTORY},
# else the top of the build tree: build a service's `c/` folder into
# `<service dir>/build` and the host finds `<service dir>/build/NAME.so`.
function(tamarco_add_extension name)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "OUTPUT_DIRECTORY" "SOURCES;LIBRARIES;INCLUDE_DIRECTORIES")
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "tamarco_add_extension(${name}): SOURCES is required")
  endif()
  if(ARG_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "tamarco_add_extension(${name}): unknown arguments: ${ARG_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT ARG_OUTPUT_DIRECTORY)
    if(TAMARCO_EXTENSION_OUTPUT_DIRECTORY)
      set(ARG_OUTPUT_DIRECTORY "${TAMARCO_EXTENSION_OUTPUT_DIRECTORY}")
    else()
      set(ARG_OUTPUT_DIRECTORY "${CMAKE_BINARY_DIR}")
    endif()
  endif()
  add_library(${name} MODULE ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE TamarcoHost::headers ${ARG_LIBRARIES})
  if(ARG_INCLUDE_DIRECTORIES)
    target_include_directories(${name} PRIVATE ${ARG_INCLUDE_DIRECTORIES})
  endif()
  set_target_properties(${name} PROPERTIES
    PREFIX "" SUFFIX ".so" OUTPUT_NAME ${name}
    C_STANDARD 11 C_STANDARD_REQUIRED ON
    LIBRARY_OUTPUT_DIRECTORY "${ARG_OUTPUT_DIRECTORY}")
  if(CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${name} PRIVATE -Wall -Wextra)
  endif()
endfunction()
